# A worker of master.r: connects to the master, sends a greeting and prints the answer.
print(Sys.getenv("CDSW_MASTER_IP"))

# The master listens for one worker at a time (socketConnection(server=TRUE) accepts one
# connection and stops listening): a worker that comes while the master is busy with another is
# refused, or taken in by the kernel and dropped unanswered. It tries again until answered.
server_resp <- character()
for (attempt in 1:120) {
  con <- tryCatch(
    suppressWarnings(socketConnection(host=Sys.getenv("CDSW_MASTER_IP"), port=6000,
                                      server=FALSE, blocking=TRUE, open="r+")),
    error=function(e) NULL)
  if (!is.null(con)) {
    server_resp <- tryCatch(suppressWarnings({
      writeLines("Hello from worker!", con)
      readLines(con, 1)
    }), error=function(e) character())
    close(con)
    if (length(server_resp) == 1) break
  }
  Sys.sleep(0.5)
}
if (length(server_resp) != 1) stop("no answer from the master at ", Sys.getenv("CDSW_MASTER_IP"))
print(paste("Worker received:", server_resp))
