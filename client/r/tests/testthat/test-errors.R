# Refusals become typed R conditions, and launch nothing.

expect_berth_error <- function(expr, code) {
  e <- tryCatch(expr, error = function(e) e)
  expect_s3_class(e, "berth_error")
  expect_equal(class(e),
               c(paste0("berth_", tolower(code)), "berth_error", "error", "condition"))
  expect_equal(e$code, code)
  expect_type(e$message, "character")
  expect_true(nzchar(e$message))
  expect_equal(conditionMessage(e), paste0(code, ": ", e$message))
  invisible(e)
}

test_that("bad arguments give typed errors", {
  before <- length(list.workers(all_sessions = TRUE))
  e <- expect_berth_error(
    launch.workers(n = 0, cpu = CPU, memory = MEMORY, code = "1"), "INVALID_ARGUMENT")
  expect_match(e$message, "\\bn\\b")
  e <- expect_berth_error(
    launch.workers(n = 1, cpu = 0, memory = MEMORY, code = "1"), "INVALID_ARGUMENT")
  expect_match(e$message, "cpu")
  expect_berth_error(launch.workers(n = -1, cpu = CPU, memory = MEMORY, code = "1"),
                     "INVALID_ARGUMENT")
  expect_berth_error(launch.workers(n = 1.5, cpu = CPU, memory = MEMORY, code = "1"),
                     "INVALID_ARGUMENT")
  expect_berth_error(launch.workers(n = 1, cpu = NA, memory = MEMORY, code = "1"),
                     "INVALID_ARGUMENT")
  expect_berth_error(launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = "1",
                                    kernel = "cobol"), "INVALID_ARGUMENT")
  expect_berth_error(launch.workers(n = 1, cpu = CPU, memory = MEMORY, code = "1",
                                    env = list("no name")), "INVALID_ARGUMENT")
  e <- expect_berth_error(
    launch.workers(n = 2, cpu = 1e6, memory = MEMORY, code = "1"), "RESOURCE_EXHAUSTED")
  expect_match(e$message, "cpu")
  expect_berth_error(launch.workers(n = 1, cpu = CPU, memory = 1e6, code = "1"),
                     "RESOURCE_EXHAUSTED")
  expect_berth_error(launch.workers(n = 1, cpu = CPU, memory = MEMORY,
                                    script = "no/such/script.r"), "FAILED_PRECONDITION")
  # None of them launched anything.
  expect_equal(length(list.workers(all_sessions = TRUE)), before)
})

test_that("unknown ids are NOT_FOUND", {
  e <- expect_berth_error(await.workers("nosuchworker9"), "NOT_FOUND")
  expect_match(e$message, "nosuchworker9")
  expect_berth_error(stop.workers("nosuchworker9"), "NOT_FOUND")
  expect_berth_error(await.workers(list(list(id = "nosuchworker9"))), "NOT_FOUND")
  expect_error(await.workers("nosuchworker9"), class = "berth_not_found")
})

test_that("no CLI, no server: typed errors too", {
  withr::with_options(list(berth.cli = file.path(tempdir(), "no-berth-here")), {
    e <- expect_berth_error(list.workers(all_sessions = TRUE), "FAILED_PRECONDITION")
    expect_match(e$message, "BERTH_CLI")
  })
  withr::with_envvar(c(BERTH_ADDR = paste0("unix:", tempdir(), "/nobody.sock")), {
    expect_berth_error(list.workers(all_sessions = TRUE), "UNAVAILABLE")
  })
})
