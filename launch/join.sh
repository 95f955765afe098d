#!/usr/bin/env bash
# Join a running swarm (or start one: leave ADDRESS out) as one DiLoCo peer.
#
#   launch/join.sh /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... --peers.key_file run.key \
#       [--peers.listen /ip4/0.0.0.0/tcp/31338 --peers.announce /ip4/THIS_PUBLIC_IP/tcp/31338] \
#       [--config configs/tiny.toml] [--run.dir runs/peer-1] [any --section.key value]
#
# ADDRESS is a line of the first peer's or the bootstrap node's <run.dir>/address.txt;
# several may be given comma-separated. Ctrl-C leaves the swarm cleanly.
# Other arguments are `dilo train` options (python -m dilo.cli train --help lists them);
# paths in them are relative to the directory you run this from. -h/--help: this text.
set -euo pipefail
usage() { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
for arg in "$@"; do case "$arg" in -h|--help) usage; exit 0 ;; esac; done
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative paths in the arguments stay yours
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
initial=()
if [[ $# -gt 0 && "$1" == /* ]]; then
    initial=(--peers.initial "$1")
    shift
fi
exec "$PYTHON" -m dilo.cli train --config "$REPO/configs/tiny.toml" --comm.backend hivemind \
    --run.dir "runs/peer-$(hostname)-$$" "${initial[@]}" "$@"
