"""`dilo swarm`: a bootstrap node for the hivemind backend. It trains nothing.

    dilo swarm --config configs/tiny.toml --peers.key_file run.key \
               --peers.listen /ip4/0.0.0.0/tcp/31337 [--peers.announce /ip4/PUBLIC_IP/tcp/31337]

It keeps the swarm's DHT reachable at a fixed address while training peers come and go,
and admits peers like any member: wrong run key or other run settings are refused. It
prints the addresses to join (also in <run.dir>/address.txt) and runs until Ctrl-C or
SIGTERM. Give it a `--peers.identity_file` so its address survives restarts.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from dilo.comm.build import swarm_group_class
from dilo.config import parse_args
from dilo.config_help import SWARM_ABOUT, SWARM_USAGE, help_text, wants_help

log = logging.getLogger("dilo")


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(help_text(SWARM_USAGE, SWARM_ABOUT))
        return 0
    try:
        cfg = parse_args(["--comm.backend", "hivemind", *argv])
    except ValueError as e:
        print(f"dilo: config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        node = swarm_group_class().from_config(cfg)
    except ValueError as e:
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    try:
        log.info("bootstrap node up (fingerprint %s); Ctrl-C or SIGTERM stops it", node.fingerprint)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
