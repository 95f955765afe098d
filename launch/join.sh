#!/usr/bin/env bash
# Join a running swarm (or start one: leave ADDRESS out) as one DiLoCo peer.
#
#   launch/join.sh /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... --peers.key_file run.key \
#       [--peers.listen /ip4/0.0.0.0/tcp/31338 --peers.announce /ip4/THIS_PUBLIC_IP/tcp/31338] \
#       [--config configs/tiny.toml] [--run.dir runs/peer-1] [any --section.key value]
#
# ADDRESS is a line of the first peer's or the bootstrap node's <run.dir>/address.txt;
# several may be given comma-separated. Ctrl-C leaves the swarm cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
initial=()
if [[ $# -gt 0 && "$1" == /* ]]; then
    initial=(--peers.initial "$1")
    shift
fi
exec python -m dilo.cli train --config configs/tiny.toml --comm.backend hivemind \
    --run.dir "runs/peer-$(hostname)-$$" "${initial[@]}" "$@"
