#!/usr/bin/env bash
# One machine, NPROC DiLoCo workers (one process each).
#
#   NPROC=4 launch/torchrun_single_node.sh --config configs/tiny.toml --comm.codec int8
#
# Environment:
#   NPROC   processes (= DiLoCo workers) on this machine        (default 4)
#   PYTHON  interpreter with dilo and torch installed             (default: .venv/bin/python if present)
# Every other argument goes to dilo.train (--config FILE, --section.key VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-4}" -m dilo.train "$@"
