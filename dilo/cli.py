"""The `dilo` console script: `dilo train ...`, `dilo swarm ...`, `dilo --version`."""

from __future__ import annotations

import sys

USAGE = """usage: dilo [-h] [--version] <command> [options]

commands:
  train    train one worker (under torchrun: one worker per process)
           dilo train --config configs/tiny.toml --outer.inner_steps 20
           dilo train --help   lists every config key with its type, default and meaning
  swarm    run a bootstrap node for the hivemind backend (trains nothing; see docs/swarm.md)
           dilo swarm --config configs/tiny.toml --peers.key_file run.key --peers.listen /ip4/0.0.0.0/tcp/31337
           dilo swarm --help

options:
  -h, --help   show this help and exit
  --version    print dilo's version and exit"""

SWARM_USAGE = "usage: dilo swarm [--config FILE.toml] [--section.key VALUE | --section.key=VALUE ...]"
SWARM_ABOUT = """Run a bootstrap node for the hivemind backend: it trains nothing, keeps the swarm's
DHT reachable at a fixed address while peers come and go, prints the address to join (also
written to <run.dir>/address.txt) and runs until Ctrl-C or SIGTERM. It admits peers like any
member, so give it the training peers' --config (model, outer, comm: the run fingerprint)
and their run key. The keys that matter to it are run.dir and peers.* (docs/swarm.md);
comm.backend is always hivemind."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from dilo import __version__

        print(f"dilo {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dilo.train import main as train_main

        return train_main(rest)  # `--help` is answered by dilo.config.parse_args
    if command == "swarm":
        if "-h" in rest or "--help" in rest:
            from dilo.config_help import help_text

            print(help_text(SWARM_USAGE, SWARM_ABOUT))
            return 0
        from dilo.bootstrap import main as swarm_main

        return swarm_main(rest)
    print(f"dilo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
