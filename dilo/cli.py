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
  export   write a checkpoint's global model as a published version (safetensors + manifest)
           dilo export runs/default/checkpoints/step-000010 published/

options:
  -h, --help   show this help and exit
  --version    print dilo's version and exit"""


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

        return train_main(rest)  # answers --help itself
    if command == "swarm":
        from dilo.bootstrap import main as swarm_main  # answers --help itself

        return swarm_main(rest)
    if command == "export":
        return export_main(rest)
    print(f"dilo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def export_main(args: list[str]) -> int:
    """`dilo export CHECKPOINT OUT`: OUT/step-XXXXXX/ and OUT/latest (docs/continual.md)."""
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: dilo export CHECKPOINT OUT\n  CHECKPOINT: a worker-*.pt file or a step folder; "
              "OUT: the folder that receives step-XXXXXX/ (model.safetensors, manifest.json) and latest",
              file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    from dilo import checkpoint
    from dilo.publish import export_checkpoint

    try:
        folder = export_checkpoint(args[0], args[1])
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"dilo: export: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
