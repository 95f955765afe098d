#!/usr/bin/env bash
# A bootstrap node for a swarm (trains nothing): keeps the DHT reachable at a fixed address
# and prints the multiaddr others join with (also written to <run.dir>/address.txt).
#
#   openssl rand -hex 32 > run.key        # once; copy run.key to every machine of the run
#   launch/bootstrap.sh --peers.key_file run.key --peers.listen /ip4/0.0.0.0/tcp/31337 \
#       [--peers.announce /ip4/PUBLIC_IP/tcp/31337] [--config configs/tiny.toml]
#
# Use the same --config (model, H, codec, run.steps) as the training peers: the bootstrap
# refuses peers whose run settings differ, like any member does.
# Other arguments are `dilo swarm` options (python -m dilo.cli swarm --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m dilo.cli swarm --config "$REPO/configs/tiny.toml" --run.dir runs/bootstrap \
    --peers.identity_file runs/bootstrap/identity.key "$@"
