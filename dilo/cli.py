"""The `dilo` console script: `dilo train [--config FILE] [--section.key VALUE ...]`."""

from __future__ import annotations

import sys

USAGE = """usage: dilo <command> [options]

commands:
  train    train one worker (under torchrun: one worker per process)
           dilo train --config configs/tiny.toml --outer.inner_steps 20
           dilo train --help   lists every config key
  swarm    run a bootstrap node for the hivemind backend (trains nothing; see docs/swarm.md)
           dilo swarm --config configs/tiny.toml --peers.key_file run.key --peers.listen /ip4/0.0.0.0/tcp/31337
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dilo.train import main as train_main

        return train_main(rest)
    if command == "swarm":
        from dilo.bootstrap import main as swarm_main

        return swarm_main(rest)
    print(f"dilo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
