# The session of an R process: its workers' output in that process's output, and its end
# with the process (kill -9 included).

two_workers_print <- function(mode) {
  c(
    sprintf("options(berth.output = '%s')", mode),
    "library(berth)",
    paste0("w <- launch.workers(n = 2, cpu = ", CPU, ", memory = ", MEMORY, ","),
    "  code = \"cat('line one\\n'); cat('line two\\n'); message('on stderr')\")",
    "cat('IDS', vapply(w, function(x) x$id, ''), '\\n')",
    "r <- await.workers(w)",
    "stopifnot(length(r$failures) == 0)"
  )
}

for (mode in c("console", "spool")) {
  test_that(sprintf("output of two workers shows in the launching R process (%s)", mode), {
    run <- run_rscript(two_workers_print(mode))
    expect_equal(run$status, 0L, info = paste(run$output, collapse = "\n"))
    ids_line <- grep("^IDS ", run$output, value = TRUE)
    expect_length(ids_line, 1)
    ids <- strsplit(trimws(sub("^IDS ", "", ids_line)), " ")[[1]]
    expect_length(ids, 2)
    for (id in ids) {
      expect_lines(run$output, sprintf("[%s] %s", id, c("line one", "line two", "on stderr")))
    }
  })
}

# A child Rscript that launches two sleepers in its session (lease `ttl`), writes its pid, the
# holder's pid and the workers' ids to a file, and sleeps. Returns those.
start_sleeping_parent <- function(ttl) {
  info <- tempfile("parent-")
  code <- c(
    sprintf("options(berth.session_ttl = %d)", ttl),
    "library(berth)",
    paste0("w <- launch.workers(n = 2, cpu = ", CPU, ", memory = ", MEMORY,
           ", code = 'Sys.sleep(600)')"),
    "s <- berth:::.berth$session",
    sprintf("writeLines(c(Sys.getpid(), s$holder_pid, vapply(w, function(x) x$id, '')), '%s.tmp')",
            info),
    sprintf("file.rename('%s.tmp', '%s')", info, info),
    "Sys.sleep(600)"
  )
  file <- tempfile("parent-", fileext = ".R")
  writeLines(code, file)
  log <- tempfile("parent-log-")
  system2(rscript, shQuote(file), stdout = log, stderr = log, wait = FALSE)
  lines <- wait_until("the child R to launch its workers", 60, function() {
    if (file.exists(info)) readLines(info) else NULL
  })
  unlink(c(info, file))
  list(pid = as.integer(lines[1]), holder = as.integer(lines[2]), ids = lines[3:4], log = log)
}

alive <- function(pid) {
  stat <- file.path("/proc", pid, "stat")
  file.exists(stat) && !grepl("^[0-9]+ \\(.*\\) [ZX]", readLines(stat, warn = FALSE))
}

# Waits until the workers `ids` have all ended; returns them and how long that took.
wait_stopped <- function(ids, since, timeout) {
  ws <- wait_until("the workers to stop", timeout, function() {
    ws <- workers_now(ids)
    if (all(vapply(ws, function(w) w$status %in% berth:::ENDED, TRUE))) ws else NULL
  })
  list(workers = ws, took = as.numeric(Sys.time() - since, units = "secs"))
}

test_that("kill -9 of the R process stops its workers within the lease", {
  ttl <- 5
  p <- start_sleeping_parent(ttl)
  withr::defer({
    tools::pskill(p$pid, tools::SIGKILL)
    cli("stop", "--grace=0", p$ids)
    unlink(p$log)
  })
  r <- await.workers(p$ids, wait_for_completion = FALSE, timeout_seconds = 60)
  expect_length(r$failures, 0)
  # Alive past its lease: the holder renews it.
  Sys.sleep(ttl + 1)
  for (w in workers_now(p$ids)) expect_equal(w$status, "WORKER_STATUS_RUNNING")
  t0 <- Sys.time()
  tools::pskill(p$pid, tools::SIGKILL)
  s <- wait_stopped(p$ids, t0, 60)
  for (w in s$workers) {
    expect_equal(w$status, "WORKER_STATUS_STOPPED")
    expect_equal(w$reason, "session ended")
  }
  expect_lt(s$took, ttl)
  # The holder is gone with the session.
  wait_until("the holder to exit", 10, function() !alive(p$holder))
})

test_that("when the holder is killed, the lease lapses and the workers stop", {
  ttl <- 3
  p <- start_sleeping_parent(ttl)
  withr::defer({
    tools::pskill(p$pid, tools::SIGKILL)
    cli("stop", "--grace=0", p$ids)
    unlink(p$log)
  })
  await.workers(p$ids, wait_for_completion = FALSE, timeout_seconds = 60)
  expect_true(alive(p$holder))
  t0 <- Sys.time()
  tools::pskill(p$holder, tools::SIGKILL)
  s <- wait_stopped(p$ids, t0, 60)
  for (w in s$workers) {
    expect_equal(w$status, "WORKER_STATUS_STOPPED")
    expect_equal(w$reason, "session ended")
  }
  # The lease, the server's expiry check (each second) and the stop of `Sys.sleep`.
  expect_lt(s$took, ttl + 5)
})

test_that("the session closes when R ends, and the next launch opens another", {
  run <- run_rscript(c(
    "library(berth)",
    paste0("w <- launch.workers(n = 1, cpu = ", CPU, ", memory = ", MEMORY,
           ", code = 'Sys.sleep(600)')"),
    "cat('ID', w[[1]]$id, '\\n')",
    "s1 <- berth:::session_id()",
    "berth:::close_session()",
    paste0("w2 <- launch.workers(n = 1, cpu = ", CPU, ", memory = ", MEMORY,
           ", code = 'Sys.sleep(600)')"),
    "stopifnot(w2[[1]]$session_id != s1)",
    "cat('ID', w2[[1]]$id, '\\n')"
  ))
  expect_equal(run$status, 0L, info = paste(run$output, collapse = "\n"))
  ids <- sub("^ID (\\S+) *$", "\\1", grep("^ID ", run$output, value = TRUE))
  expect_length(ids, 2)
  # R's exit closed the second session: its worker is stopping or stopped by now.
  s <- wait_stopped(ids, Sys.time(), 30)
  for (w in s$workers) expect_equal(w$reason, "session ended")
})

test_that("a session that ended under R is replaced at the next launch", {
  run <- run_rscript(c(
    "options(berth.session_ttl = 2)",
    "library(berth)",
    "# No session until one is needed: these open none.",
    "stopifnot(length(list.workers()) == 0, length(await.workers()$workers) == 0,",
    "          length(stop.workers()) == 0, is.null(berth:::session_id(open = FALSE)))",
    paste0("w <- launch.workers(n = 1, cpu = ", CPU, ", memory = ", MEMORY, ", code = '1')"),
    "s <- berth:::.berth$session",
    "tools::pskill(s$holder_pid, tools::SIGKILL)",
    "Sys.sleep(4)",
    paste0("w2 <- launch.workers(n = 1, cpu = ", CPU, ", memory = ", MEMORY,
           ", code = 'cat(\"again\\n\")')"),
    "stopifnot(w2[[1]]$session_id != s$id)",
    "stopifnot(length(await.workers(w2)$failures) == 0)"
  ))
  expect_equal(run$status, 0L, info = paste(run$output, collapse = "\n"))
  expect_true(any(grepl("has ended; opening a new one", run$output)),
              info = paste(run$output, collapse = "\n"))
  expect_true(any(grepl("^\\[[a-z0-9]+\\] again$", run$output)),
              info = paste(run$output, collapse = "\n"))
})
