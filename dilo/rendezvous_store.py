"""A standalone c10d rendezvous store that outlives any training node.

torchrun's c10d rendezvous keeps its state in a TCPStore, by default hosted inside the
agent of the node named by `--rdzv-endpoint`. If that node is preempted, the store goes
with it and every other agent fails: the run cannot survive the loss of that one node.
Run this store on a machine that stays up (a login or head node), and start the agents
with `--rdzv-conf is_host=false` (launch/torchrun_elastic.sh does, with RDZV_STORE=external):

    python -m dilo.rendezvous_store --port 29400        # on the stable host
    RDZV_HOST=head RDZV_STORE=external NNODES=1:4 launch/torchrun_elastic.sh ...   # every node

The store only holds rendezvous bookkeeping (a few kB); it sees no training data.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=29400, help="TCP port (default 29400)")
    args = parser.parse_args(argv)
    from torch.distributed import TCPStore

    try:
        store = TCPStore(args.host, args.port, is_master=True, multi_tenant=True,
                         wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, OSError) as e:
        print(f"dilo: cannot host the rendezvous store on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"dilo rendezvous store listening on {args.host}:{args.port}", flush=True)
    done.wait()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
