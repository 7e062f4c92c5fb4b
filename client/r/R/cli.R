# Running the `berth` command-line tool: where it is, the JSON documents it prints with
# --json (client/JSON.md in the berth repository is their contract), and its errors as R
# conditions. R has no maintained gRPC library; the CLI speaks berth.v1 for us.

# The CLI: options(berth.cli = ...), else BERTH_CLI, else `berth` on PATH.
berth_cli <- function() {
  path <- getOption("berth.cli")
  if (is.null(path) || !nzchar(path)) path <- Sys.getenv("BERTH_CLI")
  if (!nzchar(path)) path <- unname(Sys.which("berth"))
  if (!nzchar(path) || !file.exists(path)) {
    stop(berth_condition(
      "FAILED_PRECONDITION",
      paste("the berth command-line tool was not found: put it on PATH,",
            "or set BERTH_CLI or options(berth.cli = \"/path/to/berth\")")
    ))
  }
  path
}

# An error of berth: classes berth_<code> (berth_invalid_argument, berth_not_found, ...),
# berth_error, error, condition; `code` is the gRPC code's name, `message` the server's.
berth_condition <- function(code, message, call = NULL) {
  structure(
    class = c(paste0("berth_", tolower(code)), "berth_error", "error", "condition"),
    list(message = message, call = call, code = code)
  )
}

conditionMessage.berth_error <- function(c) {
  paste0(c$code, ": ", c$message)
}

# The error document of a failed call, from the CLI's stderr: the last line that is one.
error_document <- function(lines) {
  for (line in rev(lines)) {
    if (!startsWith(line, "{\"error\"")) next
    doc <- tryCatch(jsonlite::fromJSON(line, simplifyVector = TRUE), error = function(e) NULL)
    if (!is.null(doc$error$code)) return(doc$error)
  }
  NULL
}

# Parses a document of the CLI: arrays of values become vectors, objects named lists, arrays
# of objects lists of named lists (never data frames), null NULL.
parse_document <- function(lines) {
  jsonlite::fromJSON(paste(lines, collapse = "\n"), simplifyVector = TRUE,
                     simplifyDataFrame = FALSE, simplifyMatrix = FALSE)
}

# Runs `berth --json ARGS` and returns its document. A failure is signalled as a berth
# condition; `workers_failed_ok`: exit status 1 with a document (`berth await` whose workers
# failed) is a result.
berth_run <- function(args, workers_failed_ok = FALSE) {
  cli <- berth_cli()
  err <- tempfile("berth-stderr-")
  on.exit(unlink(err), add = TRUE)
  # system2 runs a shell command line: every argument is quoted. Its warning on a non-zero
  # exit status is replaced by the condition below.
  out <- suppressWarnings(
    system2(cli, c("--json", shQuote(args)), stdout = TRUE, stderr = err)
  )
  status <- attr(out, "status")
  if (is.null(status)) status <- 0L
  if (status != 0L) {
    errors <- if (file.exists(err)) readLines(err, warn = FALSE) else character()
    doc <- error_document(errors)
    if (!is.null(doc)) stop(berth_condition(doc$code, doc$message))
    if (!(workers_failed_ok && status == 1L && length(out))) {
      stop(berth_condition("UNKNOWN", paste0(
        "berth ", paste(args[seq_len(min(2L, length(args)))], collapse = " "),
        " exited with status ", status,
        if (length(errors)) paste0(": ", paste(errors, collapse = "\n"))
      )))
    }
  }
  if (!length(out)) return(NULL)
  parse_document(out)
}

# A number as a command-line value that reads back exactly (0.2, not 0.20000000000000001
# rounded to 0.2 by printing).
number_arg <- function(flag, x, name) {
  if (!is.numeric(x) || length(x) != 1L || is.na(x)) {
    stop(berth_condition("INVALID_ARGUMENT", sprintf("%s: must be one number", name)))
  }
  paste0(flag, "=", sprintf("%.17g", as.double(x)))
}

string_arg <- function(x, name) {
  if (is.null(x)) return("")
  if (!is.character(x) || length(x) != 1L || is.na(x)) {
    stop(berth_condition("INVALID_ARGUMENT", sprintf("%s: must be one string", name)))
  }
  x
}
