#!/usr/bin/env bash
# Elastic multi-node DiLoCo: nodes may die and come back; the run goes on (docs/elastic.md).
# Run the same command on every node; each node runs one torchrun agent:
#
#   NNODES=1:4 NPROC=8 RDZV_HOST=node0.example RUN_ID=exp1 \
#       launch/torchrun_elastic.sh --config configs/150m.toml --checkpoint.every 1
#
# When a worker or node fails, or a node joins, torchrun restarts every worker; they resume
# with --checkpoint.resume auto (passed here): exactly when the world size is unchanged,
# elastically (global state broadcast, data re-balanced) when it changed.
#
# Environment:
#   NNODES        MIN:MAX nodes (e.g. 1:4), or N                         (required)
#   NPROC         processes per node (= DiLoCo workers per node)          (default 1)
#   RDZV_HOST     host of the c10d rendezvous store                       (required)
#   RDZV_PORT     its TCP port                                            (default 29400)
#   RDZV_STORE    agent: the agent on RDZV_HOST hosts the store (that node must never die);
#                 external: `python -m dilo.rendezvous_store --port $RDZV_PORT` runs on
#                 RDZV_HOST, a machine that stays up, and no agent hosts it  (default agent)
#   RUN_ID        rendezvous id, the same on every node, unique per run  (default dilo)
#   MAX_RESTARTS  worker-group restarts after failures; joins and leaves
#                 of nodes do not count                                   (default 100)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits after forwarding SIGTERM before SIGKILL; set it
#                 above one round (H inner steps) so a graceful stop can finish (default 300)
#   LAST_CALL     seconds the rendezvous waits for more nodes once MIN are in (default 5)
#   RDZV_EXTRA    more --rdzv-conf entries, e.g. keep_alive_interval=1,keep_alive_max_attempt=3
#                 (a dead node is noticed after interval x attempts seconds; default 5 x 3)
#   MONITOR_INTERVAL  seconds between the agent's checks of its workers    (default 1)
#   PYTHON        interpreter with dilo and torch installed
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  pick the network interface when a node has several
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES (e.g. 1:4: at least 1 node, at most 4)}"
: "${RDZV_HOST:?set RDZV_HOST to the host of the rendezvous store}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
RDZV_CONF="last_call_timeout=${LAST_CALL:-5},join_timeout=600${RDZV_EXTRA:+,$RDZV_EXTRA}"
case "${RDZV_STORE:-agent}" in
    agent) ;;
    external) RDZV_CONF="$RDZV_CONF,is_host=false" ;;
    *) echo "RDZV_STORE must be agent or external, got ${RDZV_STORE}" >&2; exit 2 ;;
esac
# torch 2.13's agents reuse the first round's master address in later rounds (shared TCP
# store), so a node that joins a running job waits forever for it; per-round stores work.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# Read by recent torch (2.13 does); older releases wait a fixed 30 s after forwarding a signal.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
exec "$PYTHON" -m dilo.torchrun \
    --nnodes "$NNODES" --nproc-per-node "${NPROC:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id "${RUN_ID:-dilo}" \
    --rdzv-conf "$RDZV_CONF" \
    --max-restarts "${MAX_RESTARTS:-100}" --monitor-interval "${MONITOR_INTERVAL:-1}" \
    -m dilo.train --checkpoint.resume auto "$@"
