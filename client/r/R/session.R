# The session of this R process: opened on first use, held by a small holder process of the
# CLI (`berth session open --hold-while <R's pid>`), closed when R ends. R is single-threaded:
# while it blocks (accepting a worker's connection, a long computation) it could renew no
# lease, so the holder does, for as long as this R process lives; it closes the session as
# soon as R is gone (a kill -9 too), and the workers end with it.
#
# The holder also copies the workers' output, line by line as `[<worker id>] <line>`:
# - "console": straight to R's own standard output and error (/proc/<pid>/fd/1 and 2), as it
#   comes, even while R is busy: terminal R and Rscript;
# - "spool": to files that this package prints from during its calls (await.workers prints as
#   lines arrive) and after every top-level call (a task callback): RStudio and Jupyter, whose
#   console shows what R prints but not what reaches its standard output;
# - "none": nowhere.
# options(berth.output = ...) or BERTH_OUTPUT choose; "auto" (the default) picks "spool" in
# RStudio and Jupyter (IRkernel) and where R's standard output is a regular file (appending
# to it from outside would be overwritten by R), else "console".

.berth <- new.env(parent = emptyenv())

session_ttl <- function() {
  ttl <- getOption("berth.session_ttl")
  if (is.null(ttl)) ttl <- Sys.getenv("BERTH_SESSION_TTL", "10")
  ttl <- suppressWarnings(as.numeric(ttl))
  if (length(ttl) != 1L || is.na(ttl) || ttl < 1 || ttl != round(ttl)) {
    stop(berth_condition("INVALID_ARGUMENT",
                         "berth.session_ttl: must be a whole number of seconds, at least 1"))
  }
  ttl
}

# Where this process's descriptor `fd` leads: a terminal, a pipe, a file.
fd_target <- function(fd) {
  Sys.readlink(sprintf("/proc/%d/fd/%d", Sys.getpid(), fd))
}

# Whether the holder can write to descriptor `fd` of R from outside without clashing with R:
# a terminal or a pipe (a file would be overwritten where R writes next).
console_fd <- function(fd) {
  grepl("^(pipe:|/dev/)", fd_target(fd))
}

output_mode <- function() {
  mode <- getOption("berth.output")
  if (is.null(mode)) mode <- Sys.getenv("BERTH_OUTPUT", "auto")
  modes <- c("auto", "console", "spool", "none")
  if (!(length(mode) == 1L && mode %in% modes)) {
    stop(berth_condition("INVALID_ARGUMENT", paste0(
      "berth.output: must be one of ", paste(modes, collapse = ", ")
    )))
  }
  if (mode != "auto") return(mode)
  in_ide <- identical(Sys.getenv("RSTUDIO"), "1") ||
    isTRUE(getOption("jupyter.in_kernel")) ||
    "IRkernel" %in% loadedNamespaces()
  if (in_ide || !console_fd(1L)) "spool" else "console"
}

# The id of this process's session; opens one when there is none and `open`.
session_id <- function(open = TRUE) {
  if (!is.null(.berth$session) && identical(.berth$pid, Sys.getpid())) {
    return(.berth$session$id)
  }
  if (!open) return(NULL)
  open_session()$id
}

open_session <- function() {
  pid <- Sys.getpid()
  mode <- output_mode()
  args <- c("session", "open", paste0("--ttl=", session_ttl()),
            paste0("--hold-while=", pid), "--label=berth.client=r")
  spool <- NULL
  if (mode == "console") {
    args <- c(args, sprintf("--output=/proc/%d/fd/1", pid))
    if (console_fd(2L)) args <- c(args, sprintf("--output-stderr=/proc/%d/fd/2", pid))
  } else if (mode == "spool") {
    dir <- tempfile("berth-output-")
    dir.create(dir)
    spool <- new.env(parent = emptyenv())
    spool$dir <- dir
    spool$out <- file.path(dir, "stdout")
    spool$err <- file.path(dir, "stderr")
    spool$out_at <- 0
    spool$err_at <- 0
    file.create(spool$out, spool$err)
    args <- c(args, paste0("--output=", spool$out), paste0("--output-stderr=", spool$err))
  }
  s <- berth_run(args)
  .berth$session <- s
  .berth$pid <- pid
  .berth$spool <- spool
  if (!isTRUE(.berth$finalizer)) {
    # The namespace holds .berth for good: this runs when R ends.
    reg.finalizer(.berth, function(e) close_session(), onexit = TRUE)
    .berth$finalizer <- TRUE
  }
  if (!is.null(spool) && is.null(.berth$callback)) {
    .berth$callback <- addTaskCallback(function(...) {
      show_output()
      TRUE
    }, name = "berth-output")
  }
  s
}

# Forgets the session (it has ended); the next call opens another.
forget_session <- function() {
  show_output()
  sp <- .berth$spool
  if (!is.null(sp)) unlink(sp$dir, recursive = TRUE)
  .berth$session <- NULL
  .berth$spool <- NULL
}

# Closes this process's session: its workers are stopped. A forked child of this process (the
# parallel package) shares .berth but not the session.
close_session <- function() {
  s <- .berth$session
  if (is.null(s) || !identical(.berth$pid, Sys.getpid())) return(invisible(NULL))
  try(berth_run(c("session", "close", s$id)), silent = TRUE)
  forget_session()
  invisible(NULL)
}

# Prints what the holder has spooled since the last call: stdout lines with cat(), stderr lines
# with message() (red in RStudio). Returns whether there was anything.
show_output <- function() {
  sp <- .berth$spool
  if (is.null(sp)) return(FALSE)
  new_out <- print_new_lines(sp, "out", function(text) cat(text))
  new_err <- print_new_lines(sp, "err", function(text) message(text, appendLF = FALSE))
  new_out || new_err
}

print_new_lines <- function(sp, which, write) {
  path <- sp[[which]]
  at <- sp[[paste0(which, "_at")]]
  size <- file.size(path)
  if (is.na(size) || size <= at) return(FALSE)
  con <- file(path, "rb")
  on.exit(close(con))
  seek(con, at)
  bytes <- readBin(con, "raw", n = size - at)
  ends <- which(bytes == as.raw(10L))
  # Whole lines only: the holder writes one line at a time.
  if (!length(ends)) return(FALSE)
  last <- max(ends)
  bytes <- bytes[seq_len(last)]
  bytes[bytes == as.raw(0L)] <- as.raw(0x3fL)
  sp[[paste0(which, "_at")]] <- at + last
  write(rawToChar(bytes))
  TRUE
}

# After workers ended: their last lines may still be on their way to the spool.
settle_output <- function() {
  if (is.null(.berth$spool)) return(invisible())
  quiet <- 0L
  for (i in 1:20) {
    Sys.sleep(0.1)
    if (show_output()) quiet <- 0L else quiet <- quiet + 1L
    if (quiet >= 3L) break
  }
  invisible()
}
