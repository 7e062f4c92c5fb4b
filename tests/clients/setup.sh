#!/usr/bin/env bash
# Prepares what the client tests need, idempotently: a Python venv with grpcio, grpcio-tools and
# pytest, the Python client installed in it from client/python (rebuilt every time, so the test
# runs the package as it is now), R with jsonlite and testthat (Debian's packages), and the R
# client installed in a library of its own. Run by tests/clients/main.rs and by .ci/run; prints
# the paths it made as `KEY=VALUE` lines on its last lines.
#
# Env: BERTH_CLIENT_VENV (target/client-venv), BERTH_CLIENT_RLIB (target/client-rlib)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${BERTH_CLIENT_VENV:-$root/target/client-venv}
rlib=${BERTH_CLIENT_RLIB:-$root/target/client-rlib}
log() { echo "client-setup: $*" >&2; }

# Python: the system interpreter where it has venv (the pyenv shim on PATH is slow to start).
py=/usr/bin/python3
"$py" -c 'import venv, ensurepip' 2>/dev/null || py=python3
if ! "$venv/bin/python" -c 'import grpc, grpc_tools, pytest' 2>/dev/null; then
  log "making $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio>=1.60' 'grpcio-tools>=1.60' 'pytest>=7' setuptools wheel >&2
fi
# Built in place with the venv's grpcio-tools: the stubs are generated from proto/ at build time.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --no-deps \
  --force-reinstall "$root/client/python" >&2

# R (Debian's packages; CRAN is out of reach here).
if ! command -v Rscript >/dev/null 2>&1 \
  || ! Rscript -e 'library(jsonlite); library(testthat)' >/dev/null 2>&1; then
  log "installing R, jsonlite and testthat (apt)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    r-base-core r-cran-jsonlite r-cran-testthat >&2
fi
mkdir -p "$rlib"
R CMD INSTALL --no-multiarch --no-test-load -l "$rlib" "$root/client/r" >"$rlib.log" 2>&1 \
  || { cat "$rlib.log" >&2; exit 1; }

echo "BERTH_CLIENT_PYTHON=$venv/bin/python"
echo "BERTH_CLIENT_RLIB=$rlib"
