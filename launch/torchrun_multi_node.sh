#!/usr/bin/env bash
# Several machines, one DiLoCo worker per process, joined by torchrun's c10d rendezvous.
# Run the same command on every node:
#
#   NNODES=2 NPROC=8 RDZV_HOST=node0.example RUN_ID=exp1 \
#       launch/torchrun_multi_node.sh --config configs/150m.toml --data.path /data/tokens.bin
#
# Environment:
#   NNODES     number of nodes, or MIN:MAX for an elastic range            (required)
#   NPROC      processes per node (= DiLoCo workers per node)               (default 1)
#   RDZV_HOST  host of the c10d rendezvous store: any one node, reachable from all
#   RDZV_PORT  its TCP port                                                 (default 29400)
#   RUN_ID     rendezvous id, the same on every node, unique per run        (default dilo)
#   MAX_RESTARTS  torchrun restarts after a failure                         (default 0)
#   PYTHON     interpreter with dilo and torch installed
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  pick the network interface when a node has several
# The outer exchange runs on CPU tensors over gloo (cuda tensors of inner DDP use NCCL).
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES (e.g. 2, or 1:4 for elastic)}"
: "${RDZV_HOST:?set RDZV_HOST to a node every node can reach}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m dilo.torchrun \
    --nnodes "$NNODES" --nproc-per-node "${NPROC:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id "${RUN_ID:-dilo}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m dilo.train "$@"
