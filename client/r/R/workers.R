# The workbench's workers API: launch.workers, list.workers, await.workers, stop.workers.
# Workers are named lists with the fields of berth.v1's Worker as the CLI's JSON gives them
# (id, status, ip_address, exit_code, ...); lists of them have class "berth_workers" only for
# printing.

ENDED <- c("WORKER_STATUS_SUCCEEDED", "WORKER_STATUS_FAILED", "WORKER_STATUS_STOPPED",
           "WORKER_STATUS_LOST")

as_workers <- function(ws) {
  if (is.null(ws)) ws <- list()
  structure(ws, class = "berth_workers")
}

# The ids in `x`: one id, a character vector of ids, a worker (a list with `id`), a list of
# them, or an await.workers result.
worker_ids <- function(x) {
  if (is.null(x)) return(character())
  if (is.character(x)) return(x[!is.na(x) & nzchar(x)])
  if (is.list(x)) {
    id <- x[["id", exact = TRUE]]
    if (is.character(id)) return(id)
    if (!is.null(x[["workers", exact = TRUE]]) || !is.null(x[["failures", exact = TRUE]])) {
      return(c(worker_ids(x[["workers", exact = TRUE]]),
               worker_ids(x[["failures", exact = TRUE]])))
    }
    return(unlist(lapply(unname(x), worker_ids), use.names = FALSE))
  }
  stop(berth_condition("INVALID_ARGUMENT", paste(
    "ids: worker ids, or workers as launch.workers() and list.workers() return them"
  )))
}

env_args <- function(env) {
  if (is.null(env) || length(env) == 0L || identical(env, "")) return(character())
  names <- names(env)
  if (is.null(names) || any(is.na(names) | !nzchar(names)) || any(grepl("=", names, fixed = TRUE))) {
    stop(berth_condition("INVALID_ARGUMENT", paste(
      "env: a named list or named character vector of variables, names without '='",
      "(or \"\" for none)"
    )))
  }
  values <- vapply(seq_along(env), function(i) {
    v <- env[[i]]
    if (length(v) != 1L || is.na(v)) {
      stop(berth_condition("INVALID_ARGUMENT", sprintf("env[%s]: must be one value", names[i])))
    }
    as.character(v)
  }, "")
  paste0("--env=", names, "=", values)
}

launch.workers <- function(n, cpu, memory, nvidia_gpu = 0, kernel = "r", script = "",
                           code = "", env = list(), run_as_root = FALSE) {
  args <- c("launch",
            number_arg("--count", n, "n"),
            number_arg("--cpu", cpu, "cpu"),
            number_arg("--memory", memory, "memory"),
            number_arg("--gpus", nvidia_gpu, "nvidia_gpu"),
            paste0("--kernel=", string_arg(kernel, "kernel")))
  script <- string_arg(script, "script")
  code <- string_arg(code, "code")
  # `script` wins over `code`, as on the server.
  if (nzchar(script)) {
    args <- c(args, paste0("--script=", script))
  } else if (nzchar(code)) {
    args <- c(args, paste0("--code=", code))
  }
  args <- c(args, env_args(env))
  if (!is.logical(run_as_root) || length(run_as_root) != 1L || is.na(run_as_root)) {
    stop(berth_condition("INVALID_ARGUMENT", "run_as_root: must be TRUE or FALSE"))
  }
  if (run_as_root) args <- c(args, "--run-as-root")
  id <- session_id()
  r <- tryCatch(
    berth_run(c(args, paste0("--session=", id))),
    berth_not_found = function(e) {
      if (!grepl(id, e$message, fixed = TRUE)) stop(e)
      # The session ended under us (R was stopped for longer than its lease, or its holder was
      # killed): its workers are gone with it; the launch goes to a new one.
      forget_session()
      message(sprintf("berth: session %s has ended; opening a new one", id))
      NULL
    }
  )
  if (is.null(r)) r <- berth_run(c(args, paste0("--session=", session_id())))
  show_output()
  as_workers(r$workers)
}

list.workers <- function(all_sessions = FALSE) {
  if (isTRUE(all_sessions)) {
    r <- berth_run("list")
  } else {
    id <- session_id(open = FALSE)
    if (is.null(id)) return(as_workers(list()))
    r <- berth_run(c("list", paste0("--session=", id)))
  }
  show_output()
  as_workers(r$workers)
}

await.workers <- function(ids = NULL, wait_for_completion = TRUE, timeout_seconds = 60) {
  ids <- worker_ids(ids)
  if (length(ids)) {
    selector <- ids
  } else {
    id <- session_id(open = FALSE)
    if (is.null(id)) {
      return(structure(list(workers = as_workers(NULL), failures = as_workers(NULL)),
                       class = "berth_await"))
    }
    selector <- paste0("--session=", id)
  }
  if (!is.numeric(timeout_seconds) || length(timeout_seconds) != 1L ||
      is.na(timeout_seconds) || timeout_seconds < 0) {
    stop(berth_condition("INVALID_ARGUMENT",
                         "timeout_seconds: must be a number of seconds >= 0 (0: no timeout)"))
  }
  running <- if (isTRUE(wait_for_completion)) character() else "--running"
  # Spooled output is printed between rounds of one second, so that it shows as it comes;
  # otherwise it reaches R's console by itself and one call waits the whole time.
  spooling <- !is.null(.berth$spool)
  timeout <- ceiling(timeout_seconds)
  deadline <- Sys.time() + timeout
  repeat {
    round <- if (spooling) 1 else timeout
    r <- berth_run(c("await", running, paste0("--timeout=", round), selector),
                   workers_failed_ok = TRUE)
    show_output()
    if (!spooling) break
    statuses <- vapply(r$failures, function(w) w$status, "")
    if (all(statuses %in% ENDED)) break
    if (timeout > 0 && Sys.time() >= deadline) break
  }
  if (isTRUE(wait_for_completion)) settle_output()
  structure(list(workers = as_workers(r$workers), failures = as_workers(r$failures)),
            class = "berth_await")
}

stop.workers <- function(...) {
  ids <- worker_ids(list(...))
  if (length(ids)) {
    r <- berth_run(c("stop", ids))
  } else {
    id <- session_id(open = FALSE)
    if (is.null(id)) return(invisible(as_workers(list())))
    r <- berth_run(c("stop", paste0("--session=", id)))
  }
  show_output()
  invisible(as_workers(r$workers))
}

print.berth_workers <- function(x, ...) {
  if (!length(x)) {
    cat("<no workers>\n")
    return(invisible(x))
  }
  field <- function(name) {
    vapply(x, function(w) {
      v <- w[[name]]
      if (is.null(v) || !length(v) || (is.character(v) && !nzchar(v[1]))) "-" else as.character(v[1])
    }, "")
  }
  df <- data.frame(
    id = field("id"),
    status = tolower(sub("^WORKER_STATUS_", "", field("status"))),
    owner = field("owner"),
    ip_address = field("ip_address"),
    host = field("host"),
    reason = field("reason"),
    stringsAsFactors = FALSE
  )
  print(df, row.names = FALSE, right = FALSE)
  invisible(x)
}

print.berth_await <- function(x, ...) {
  cat("$workers\n")
  print(x$workers)
  cat("\n$failures\n")
  print(x$failures)
  invisible(x)
}
