#!/usr/bin/env bash
# Islands: one DiLoCo worker per node, data-parallel over the node's GPUs inside it,
# the outer exchange between nodes (docs/islands.md). Run the same command on every node:
#
#   NNODES=4 NPROC=8 RDZV_HOST=node0.example RUN_ID=exp1 \
#       launch/islands.sh --config configs/tiny.toml --run.dir /shared/runs/exp1
#
# Environment:
#   NNODES       number of nodes                                                  (required)
#   NPROC        processes (GPUs) per node                                         (default 1)
#   WORKER_SIZE  processes per DiLoCo worker; NPROC = one worker per node,
#                NPROC/2 = two workers per node; must divide NNODES x NPROC      (default NPROC)
#   RDZV_HOST    host of the c10d rendezvous store: any one node, reachable from all
#   RDZV_PORT    its TCP port                                                    (default 29400)
#   RUN_ID       rendezvous id, the same on every node, unique per run           (default dilo)
#   PYTHON       interpreter with dilo and torch installed
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  pick the network interface when a node has several
#
# torchrun gives each node a contiguous block of global ranks, and dilo makes worker w of
# ranks [w*WORKER_SIZE, (w+1)*WORKER_SIZE), so with WORKER_SIZE = NPROC a worker is a node
# and only the outer exchange crosses the slow links.
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_HOST:?set RDZV_HOST to a node every node can reach}"
NPROC=${NPROC:-1}
WORKER_SIZE=${WORKER_SIZE:-$NPROC}
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m dilo.torchrun \
    --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id "${RUN_ID:-dilo}" \
    -m dilo.train --run.worker_size "$WORKER_SIZE" "$@"
