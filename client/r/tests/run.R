# Runs the R client's tests against a real berth daemon:
#
#   R CMD INSTALL -l <lib> client/r
#   R_LIBS=<lib> BERTH_ADDR=unix:/path/berthd.sock BERTH_CLI=target/debug/berth \
#     Rscript client/r/tests/run.R
#
# from the repository root. Exits non-zero on any failure or error, and ends with the line
# `N passed, M failed` (a test counts as passed when it ran with no failed expectation, no
# error and no skip).
here <- local({
  file <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(file) != 1L) stop("run me with Rscript client/r/tests/run.R")
  dirname(normalizePath(file))
})
for (v in c("BERTH_ADDR", "BERTH_CLI")) {
  if (!nzchar(Sys.getenv(v))) {
    cat(sprintf("run.R: %s is not set (see the head of this file)\n0 passed, 1 failed\n", v))
    quit(status = 1)
  }
}
Sys.setenv(BERTH_CLI = normalizePath(Sys.getenv("BERTH_CLI")))
Sys.setenv(BERTH_REPO_ROOT = normalizePath(file.path(here, "..", "..", "..")))
suppressPackageStartupMessages({
  library(testthat)
  library(berth)
})

results <- testthat::test_dir(file.path(here, "testthat"), reporter = "summary",
                              stop_on_failure = FALSE, stop_on_warning = FALSE)
df <- as.data.frame(results)
ok <- df$failed == 0 & !df$error & !df$skipped
cat("\n")
for (i in seq_len(nrow(df))) {
  cat(sprintf("%-4s %5.1fs  %s: %s\n", if (ok[i]) "ok" else "FAIL", df$real[i],
              sub("^test-|\\.[rR]$", "", df$file[i]), df$test[i]))
}
# Whatever a test left behind: this process's session and its workers end now.
berth:::close_session()
passed <- sum(ok)
failed <- sum(!ok)
cat(sprintf("%d passed, %d failed\n", passed, failed))
quit(status = if (failed > 0 || passed == 0) 1 else 0)
