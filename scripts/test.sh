#!/usr/bin/env bash
# Sets everything up, then builds and runs every test: unit tests and the
# end-to-end tests (network namespaces, the real kernel programs). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo xtask test "$@"
