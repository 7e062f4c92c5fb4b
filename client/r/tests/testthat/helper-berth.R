# What the tests share: child R processes, waiting, and the CLI itself.

`%||%` <- function(a, b) if (is.null(a)) b else a

rscript <- file.path(R.home("bin"), "Rscript")

repo_root <- function() Sys.getenv("BERTH_REPO_ROOT")

# Small workers: many fit on a small test machine.
CPU <- 0.2
MEMORY <- 0.5

# `berth --json ARGS` (exit status 1 with a document is a result, as of `berth await`).
cli <- function(...) berth:::berth_run(c(...), workers_failed_ok = TRUE)

# Runs R code (or a file) in a child Rscript in `wd`, its stdout and stderr into one pipe;
# returns the exit status and the lines it wrote.
run_rscript <- function(code = NULL, file = NULL, wd = NULL, timeout = 180,
                        env = character()) {
  if (is.null(file)) {
    file <- tempfile("child-", fileext = ".R")
    writeLines(code, file)
    on.exit(unlink(file), add = TRUE)
  }
  if (!is.null(wd)) {
    owd <- setwd(wd)
    on.exit(setwd(owd), add = TRUE)
  }
  out <- suppressWarnings(system2(rscript, shQuote(file), stdout = TRUE, stderr = TRUE,
                                  timeout = timeout, env = env))
  list(status = attr(out, "status") %||% 0L, output = out)
}

# Calls `f` until it returns something other than NULL or FALSE, and returns that; fails
# after `timeout` seconds.
wait_until <- function(what, timeout, f) {
  deadline <- Sys.time() + timeout
  repeat {
    v <- f()
    if (!is.null(v) && !isFALSE(v)) return(v)
    if (Sys.time() > deadline) stop("timed out (", timeout, " s) waiting for ", what)
    Sys.sleep(0.1)
  }
}

# A directory for workers to work in: under /tmp and open to all, not in R's own temporary
# directory (mode 0700), so that workers that run as another user (a server that maps root to
# `worker_user`) can enter it. Removed when the calling test ends.
scratch_dir <- function(env = parent.frame()) {
  dir <- tempfile("berth-r-test-", tmpdir = "/tmp")
  dir.create(dir)
  Sys.chmod(dir, "0755", use_umask = FALSE)
  withr::defer(unlink(dir, recursive = TRUE), envir = env)
  dir
}

ids_of <- function(ws) vapply(ws, function(w) w$id, "")

# The workers `ids` as the server sees them now.
workers_now <- function(ids) cli(c("list", ids))$workers

expect_lines <- function(output, lines) {
  for (l in lines) {
    expect_true(l %in% output, info = paste0("no line ", deparse(l), " in:\n",
                                             paste(output, collapse = "\n")))
  }
}
