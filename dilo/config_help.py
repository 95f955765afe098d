"""`dilo train --help`: every config key with its type, default and description.

The descriptions are the docstrings written under the fields in dilo/config_sections.py
(read once with `ast`, so the dataclasses stay plain and readable).
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

from dilo import config, config_sections

USAGE = "usage: dilo train [--config FILE.toml] [--section.key VALUE | --section.key=VALUE ...]"
ABOUT = """Train one DiLoCo worker; under torchrun every process is a worker (or one rank of a
worker, see run.worker_size). Settings come from the defaults below, then each --config
preset (TOML, [section] key = value), then the --section.key overrides, in that order.
A list is comma-separated on the command line. A wrong key or value is refused before
anything starts. Presets: configs/*.toml."""


SWARM_USAGE = "usage: dilo swarm [--config FILE.toml] [--section.key VALUE | --section.key=VALUE ...]"
SWARM_ABOUT = """Run a bootstrap node for the hivemind backend: it trains nothing, keeps the swarm's
DHT reachable at a fixed address while peers come and go, prints the address to join (also
written to <run.dir>/address.txt) and runs until Ctrl-C or SIGTERM. It admits peers like any
member, so give it the training peers' --config (model, outer, comm: the run fingerprint)
and their run key. The keys that matter to it are run.dir and peers.* (docs/swarm.md);
comm.backend is always hivemind."""


def wants_help(argv: list[str]) -> bool:
    """`-h` or `--help` anywhere among the arguments: print the help, start nothing."""
    return any(arg in ("-h", "--help") for arg in argv)


def field_docs() -> dict[tuple[str, str], str]:
    """(section class name, field name) -> the docstring written under the field, on one line."""
    tree = ast.parse(Path(config_sections.__file__).read_text(encoding="utf-8"))
    docs = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for stmt, after in zip(cls.body, cls.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[(cls.name, stmt.target.id)] = " ".join(after.value.value.split())
    return docs


def _type_name(typ: object) -> str:
    return {str: "STR", int: "INT", float: "FLOAT", bool: "BOOL"}.get(typ, "LIST")  # list[str]


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) or '""'
    return f'"{value}"' if isinstance(value, str) else repr(value)


def help_text(usage: str = USAGE, about: str = ABOUT) -> str:
    """Every config key with its type, default and description (`dilo train --help`)."""
    docs = field_docs()
    lines = [usage, "", about, "", "  -h, --help  show this help and exit", ""]
    for i, (name, section) in enumerate(config._sections(config.Config()).items()):
        lines += [""] * (i > 0) + [f"[{name}]"]
        for f in dataclasses.fields(section):
            key = f"--{name}.{config.key_name(f.name)} {_type_name(config._field_type(section, f.name))}"
            lines.append(f"  {key:<34} (default {_shown(getattr(section, f.name))})")
            doc = docs.get((type(section).__name__, f.name), "")
            lines += textwrap.wrap(doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
