"""Print the config reference (every key, default, meaning) as a Markdown table.

    python tools/config_table.py            # the table README.md embeds
    python tools/config_table.py --check README.md   # exit 1 if README's copy is stale

The meanings are the one-line docstrings under each field in dilo/config_sections.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo import config  # noqa: E402
from dilo.config_help import field_docs  # noqa: E402  (the same reading `dilo train --help` uses)

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    docs = field_docs()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    cfg = config.Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value):
            default = getattr(value, f.name)
            shown = f'"{default}"' if isinstance(default, str) else str(default).lower() \
                if isinstance(default, bool) else repr(default)
            meaning = docs.get((type(value).__name__, f.name), "").replace("|", "\\|")
            rows.append(f"| `{section.name}.{config.key_name(f.name)}` | `{shown}` | {meaning} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="README", help="fail if this file's table is stale")
    args = parser.parse_args()
    if not args.check:
        print(table())
        return 0
    text = Path(args.check).read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.check}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    if current != table():
        print(f"{args.check}: config table is stale; regenerate with python tools/config_table.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
