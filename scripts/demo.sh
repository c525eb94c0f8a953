#!/usr/bin/env bash
# The main job: set up, then run `caloman demo` on built-in data. Results go to ${1:-results}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-results}
shift || true
exec .venv/bin/caloman demo --out "$out" "$@"
