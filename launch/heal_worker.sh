#!/usr/bin/env bash
# One worker of a run with live failover (run.failover = heal, docs/elastic.md): when a
# worker dies the others go on without it, and this script restarts it; the new process
# joins the running group at a round boundary and downloads the global state from a member.
# Start the store once, on a machine that stays up, then one of these per worker slot:
#
#   python -m dilo.rendezvous_store --port 29400                      # the stable host
#   STORE=head:29400 WORKERS=4 SLOT=0 launch/heal_worker.sh --config configs/150m.toml   # slot 0
#   STORE=head:29400 WORKERS=4 SLOT=1 launch/heal_worker.sh --config configs/150m.toml   # ...
#
# Each worker is a process of its own (no torchrun world holds them together), so one
# death takes nobody else down. A worker exits 0 when the run is finished (or it was
# stopped by SIGTERM/Ctrl-C, which this script forwards); any other exit is restarted.
#
# Environment:
#   STORE          host:port of `python -m dilo.rendezvous_store`              (required)
#   WORKERS        the run's worker slots (run.workers)                        (required)
#   SLOT           this worker's slot, 0 .. WORKERS-1 (run.slot)               (required)
#   LOCAL_WORKERS  heal workers this machine runs: each gets cores / LOCAL_WORKERS CPU threads
#                  (LOCAL_WORLD_SIZE; run.threads overrides)                      (default 1)
#   LOCAL_SLOT     this worker's index among them, 0 .. LOCAL_WORKERS-1: its GPU (LOCAL_RANK)
#                                                                              (default 0)
#   MAX_RESTARTS   restarts of this worker before giving up                    (default 100)
#   RESTART_DELAY  seconds between a death and the restart                     (default 1)
#   PYTHON         interpreter with dilo and torch installed
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them).
# -h/--help: this text.
set -uo pipefail
usage() { sed -n '2,/^set -uo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${STORE:?set STORE to host:port of python -m dilo.rendezvous_store}"
: "${WORKERS:?set WORKERS to the run's number of worker slots}"
: "${SLOT:?set SLOT to this worker's slot (0 .. WORKERS-1)}"
# The torchrun variables dilo reads for threads and the device (not RANK/WORLD_SIZE: no torchrun world).
export LOCAL_WORLD_SIZE="${LOCAL_WORKERS:-1}" LOCAL_RANK="${LOCAL_SLOT:-0}"
if ! [ "$LOCAL_RANK" -ge 0 ] 2>/dev/null || ! [ "$LOCAL_RANK" -lt "$LOCAL_WORLD_SIZE" ] 2>/dev/null; then
    echo "heal_worker: LOCAL_SLOT must be 0 .. LOCAL_WORKERS-1, got LOCAL_SLOT=$LOCAL_RANK LOCAL_WORKERS=$LOCAL_WORLD_SIZE" >&2
    exit 2
fi
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
child="" stopping=""
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
restarts=0
while :; do
    "$PYTHON" -m dilo.train --checkpoint.resume auto "$@" \
        --run.failover heal --run.workers "$WORKERS" --run.slot "$SLOT" --comm.store "$STORE" &
    child=$!
    wait "$child"; rc=$?
    while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done  # (a trapped signal ends wait early)
    child=""
    if [ "$rc" -eq 0 ] || [ -n "$stopping" ]; then exit "$rc"; fi
    restarts=$((restarts + 1))
    if [ "$restarts" -gt "${MAX_RESTARTS:-100}" ]; then
        echo "heal_worker: slot $SLOT exited with $rc; no restarts left" >&2
        exit "$rc"
    fi
    echo "heal_worker: slot $SLOT exited with $rc; restart $restarts of ${MAX_RESTARTS:-100}" >&2
    sleep "${RESTART_DELAY:-1}"
done
