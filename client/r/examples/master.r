# The workbench's R master/worker example: the master launches two workers, which connect back
# to it (CDSW_MASTER_IP) and exchange a greeting. Run it here with `Rscript master.r`: the
# workers' lines appear in this output, each prefixed with its worker id.
library("berth")

workers <- launch.workers(n=2, cpu=0.2, memory=0.5, script="worker.r")

# Accept one connection per worker.
for (i in 1:2) {
  con <- socketConnection(host="0.0.0.0", port=6000, server=TRUE, blocking=TRUE, open="r+")
  data <- readLines(con, 1)
  print(paste("Server received:", data))
  writeLines("Hello from master!", con)
  close(con)
}

# The workers end with this R session: let them finish first.
await.workers(workers)
