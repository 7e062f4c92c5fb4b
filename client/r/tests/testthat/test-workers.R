# The four calls, in this process, with the workbench's arguments.

test_that("launch.workers returns workers with the proto's fields", {
  withr::defer(stop.workers())
  workers <- launch.workers(n = 2, cpu = CPU, memory = MEMORY,
                            code = "print('Hello from a CDSW Worker')")
  expect_length(workers, 2)
  w <- workers[[1]]
  expect_type(w$id, "character")
  expect_true(nzchar(w$id))
  expect_match(w$status, "^WORKER_STATUS_")
  expect_equal(w$cpu, CPU)
  expect_equal(w$memory_gb, MEMORY)
  expect_equal(w$nvidia_gpu, 0)
  expect_equal(w$kernel, "r")
  expect_equal(w$session_id, berth:::session_id(open = FALSE))
  expect_type(w$command, "character")
  expect_match(w$command[1], "Rscript")
  expect_true("exit_code" %in% names(w))
  expect_match(w$created_at, "Z$")
  expect_equal(length(unique(ids_of(workers))), 2)

  r <- await.workers(workers)
  expect_setequal(names(r), c("workers", "failures"))
  expect_length(r$failures, 0)
  expect_setequal(ids_of(r$workers), ids_of(workers))
  for (w in r$workers) {
    expect_equal(w$status, "WORKER_STATUS_SUCCEEDED")
    expect_equal(w$exit_code, 0)
    expect_null(w$signal)
    expect_type(w$finished_at, "character")
  }
  # One id, a vector of ids, a worker: all name the same workers.
  expect_equal(ids_of(await.workers(workers[[1]]$id)$workers), workers[[1]]$id)
  expect_setequal(ids_of(await.workers(ids_of(workers))$workers), ids_of(workers))
  expect_equal(ids_of(await.workers(workers[[2]])$workers), workers[[2]]$id)
  # No ids: every worker of this session.
  expect_true(all(ids_of(workers) %in% ids_of(await.workers()$workers)))
})

test_that("list.workers lists this session's workers", {
  withr::defer(stop.workers())
  workers <- launch.workers(n = 2, cpu = CPU, memory = MEMORY, code = "Sys.sleep(600)")
  listed <- list.workers()
  expect_true(all(ids_of(workers) %in% ids_of(listed)))
  sid <- berth:::session_id(open = FALSE)
  for (w in listed) expect_equal(w$session_id, sid)
  expect_true(all(ids_of(workers) %in% ids_of(list.workers(all_sessions = TRUE))))
  # Printing is for people; the value stays a list of workers.
  expect_output(print(listed), workers[[1]]$id)
})

test_that("await.workers(wait_for_completion = FALSE) gives running workers and their IPs", {
  withr::defer(stop.workers())
  workers <- launch.workers(n = 2, cpu = CPU, memory = MEMORY, code = "Sys.sleep(600)")
  r <- await.workers(workers, wait_for_completion = FALSE, timeout_seconds = 60)
  expect_length(r$failures, 0)
  expect_length(r$workers, 2)
  for (w in r$workers) {
    expect_equal(w$status, "WORKER_STATUS_RUNNING")
    expect_match(w$ip_address, "^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$")
    expect_null(w$exit_code)
    expect_null(w$finished_at)
  }
  # Running workers do not complete within a short timeout: they are failures.
  t0 <- Sys.time()
  r <- await.workers(workers, timeout_seconds = 1)
  expect_length(r$workers, 0)
  expect_setequal(ids_of(r$failures), ids_of(workers))
  expect_lt(as.numeric(Sys.time() - t0, units = "secs"), 20)
})

test_that("stop.workers stops the named workers, and with no ids all of the session's", {
  workers <- launch.workers(n = 2, cpu = CPU, memory = MEMORY, code = "Sys.sleep(600)")
  more <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = "Sys.sleep(600)")
  await.workers(c(workers, more), wait_for_completion = FALSE)
  stopped <- stop.workers(workers[[1]])
  expect_equal(ids_of(stopped), workers[[1]]$id)
  expect_equal(workers_now(workers[[2]]$id)[[1]]$status, "WORKER_STATUS_RUNNING")
  stopped <- stop.workers()
  expect_true(all(c(workers[[2]]$id, more[[1]]$id) %in% ids_of(stopped)))
  r <- await.workers(c(workers, more), timeout_seconds = 60)
  expect_length(r$workers, 0)
  for (w in r$failures) expect_equal(w$status, "WORKER_STATUS_STOPPED")
  # Stopping what has ended changes nothing.
  expect_equal(ids_of(stop.workers(workers)), ids_of(workers))
})

test_that("env reaches the workers; env = \"\" means none", {
  withr::defer(stop.workers())
  code <- "cat(Sys.getenv('GREETING', 'unset'), Sys.getenv('CDSW_MASTER_IP') != '', '\\n')"
  for (env in list("", list(), NULL)) {
    w <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = code, env = env)
    expect_length(await.workers(w)$failures, 0)
  }
  w <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = code,
                      env = list(GREETING = "hello there", OTHER = 1))
  expect_length(await.workers(w)$failures, 0)
  w2 <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = code,
                       env = c(GREETING = "a=b"))
  expect_length(await.workers(w2)$failures, 0)
  logs <- function(id) {
    system2(Sys.getenv("BERTH_CLI"), c("logs", id), stdout = TRUE)
  }
  expect_equal(logs(w[[1]]$id), "hello there TRUE ")
  expect_equal(logs(w2[[1]]$id), "a=b TRUE ")
})

test_that("a script runs from the current directory, in the python3 kernel too", {
  withr::defer(stop.workers())
  dir <- scratch_dir()
  writeLines("cat('from a script\\n')", file.path(dir, "w.r"))
  writeLines("print('from python')", file.path(dir, "w.py"))
  withr::with_dir(dir, {
    a <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, script = "w.r",
                        code = "stop('script wins')")
    b <- launch.workers(n = 1, cpu = CPU, memory = MEMORY, kernel = "python3",
                        script = "w.py")
  })
  r <- await.workers(c(a, b))
  expect_length(r$failures, 0)
  expect_equal(a[[1]]$workdir, normalizePath(dir))
  expect_equal(b[[1]]$kernel, "python3")
})
