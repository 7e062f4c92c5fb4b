# What the documentation shows runs as written.

port_free <- function(port) {
  s <- tryCatch(serverSocket(port), error = function(e) NULL, warning = function(w) NULL)
  if (is.null(s)) return(FALSE)
  close(s)
  TRUE
}

test_that("the master/worker example runs, with the workers' lines in the master's output", {
  dir <- file.path(repo_root(), "client", "r", "examples")
  # Port 6000 may be taken (another test of this machine): the same scripts on another port.
  if (!port_free(6000)) {
    copy <- scratch_dir()
    port <- 6000 + sample(1000:9000, 1)
    for (f in c("master.r", "worker.r")) {
      text <- gsub("port=6000", paste0("port=", port), readLines(file.path(dir, f)), fixed = TRUE)
      writeLines(text, file.path(copy, f))
    }
    dir <- copy
  }
  run <- run_rscript(file = "master.r", wd = dir)
  out <- run$output
  expect_equal(run$status, 0L, info = paste(out, collapse = "\n"))
  expect_equal(sum(out == '[1] "Server received: Hello from worker!"'), 2,
               info = paste(out, collapse = "\n"))
  received <- grep('^\\[[a-z0-9]+\\] \\[1\\] "Worker received: Hello from master!"$', out,
                   value = TRUE)
  expect_length(received, 2)
  # From two workers, each line prefixed by its own id.
  expect_length(unique(sub("\\].*", "", received)), 2)
  expect_length(grep('^\\[[a-z0-9]+\\] \\[1\\] "[0-9.]+"$', out), 2)
})

test_that("the README's R code runs as written", {
  readme <- readLines(file.path(repo_root(), "README.md"))
  start <- which(readme == "## From R")
  expect_length(start, 1)
  rest <- readme[(start + 1):length(readme)]
  end <- which(startsWith(rest, "## "))[1]
  section <- rest[seq_len(if (is.na(end)) length(rest) else end - 1)]
  open <- which(section == "```r")[1]
  expect_false(is.na(open))
  close <- open + which(section[(open + 1):length(section)] == "```")[1]
  code <- section[(open + 1):(close - 1)]
  wd <- scratch_dir()
  run <- run_rscript(code, wd = wd)
  out <- run$output
  expect_equal(run$status, 0L, info = paste(out, collapse = "\n"))
  hello <- grep('^\\[[a-z0-9]+\\] \\[1\\] "Hello from a CDSW Worker"$', out, value = TRUE)
  expect_length(hello, 2)
})
