#!/usr/bin/env bash
# One machine, NPROC DiLoCo workers (one process each).
#
#   NPROC=4 launch/torchrun_single_node.sh --config configs/tiny.toml --comm.codec int8
#
# Environment:
#   NPROC   processes (= DiLoCo workers) on this machine        (default 4)
#   PYTHON  interpreter with dilo and torch installed             (default: .venv/bin/python if present)
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m dilo.torchrun --standalone --nproc-per-node "${NPROC:-4}" -m dilo.train "$@"
