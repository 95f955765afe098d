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
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
exec python -m dilo.cli swarm --config configs/tiny.toml --run.dir runs/bootstrap \
    --peers.identity_file runs/bootstrap/identity.key "$@"
