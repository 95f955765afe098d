"""Configuration: nested dataclasses, TOML presets, command-line overrides.

A run is described by one `Config`. It is built from defaults, then a TOML preset
(`--config configs/tiny.toml`), then command-line overrides `--section.key value` or
`--section.key=value`, in that order. Every value is checked before training starts;
a mistake raises `ValueError` naming the key and what is allowed.

The sections (`RunConfig`, `OuterConfig`, ...) are written in dilo/config_sections.py, each
field with its docstring; this module is where to import them from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dilo.config_checks import validate, validate_world_size  # noqa: F401  (part of this module's API)
from dilo.config_sections import (  # every section is part of this module's API
    CheckpointConfig,
    CommConfig,
    DataConfig,
    EvalConfig,
    InnerConfig,
    MetricsConfig,
    ModelConfig,
    OuterConfig,
    PeersConfig,
    PublishConfig,
    RunConfig,
)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shared_settings(self) -> dict:
        """The settings every worker of one run must share (model, algorithm, codec)."""
        return shared_settings_of(self.to_dict())

    def fingerprint(self) -> str:
        """Hash of `shared_settings()`."""
        return hashlib.sha256(json.dumps(self.shared_settings(), sort_keys=True).encode()).hexdigest()[:16]


def shared_settings_of(config: dict) -> dict:
    """`Config.shared_settings()` of a config dict (`Config.to_dict()`, as checkpoints store it)."""
    shared = {k: config[k] for k in ("model", "outer")}
    # Checkpoints from before outer.aggregate (issue 13) ran today's defaults.
    shared["outer"] = {"aggregate": "auto", "trim": 1, "clip_ratio": 2.0, "sync_every_seconds": 0.0,
                       "target_tokens": 0, "weighting": "equal", **shared["outer"]}
    shared["outer"].pop("digest", None)  # when the hash is computed changes no bit: a resume may switch it
    shared["comm"] = {k: config["comm"].get(k) for k in ("codec", "block_size", "error_feedback")}
    if config["comm"].get("owner_feedback"):
        shared["comm"]["owner_feedback"] = True
    if config["comm"].get("ef_decay", 1.0) != 1.0:
        shared["comm"]["ef_decay"] = config["comm"]["ef_decay"]
    if shared["comm"]["codec"] == "sparse":  # its keys matter only to it (older runs' fingerprints stay)
        shared["comm"].update({k: config["comm"].get(k) for k in ("density", "value_bits", "sparse_block")})
        if config["comm"].get("sparse_exchange", "gather") != "gather":
            shared["comm"]["sparse_exchange"] = config["comm"]["sparse_exchange"]
    shared["mode"] = config["run"]["mode"]
    return shared


def shared_settings_diff(stored: dict, current: dict) -> list[str]:
    """The keys where two `shared_settings()` differ, as `key = stored (now current)` texts."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = "run.mode" if k == "mode" and not prefix else prefix + key_name(k)
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(stored), flat(current)
    return [f"{k} = {a.get(k, '(unset)')} (now {b.get(k, '(unset)')})"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def key_name(field_name: str) -> str:
    """The config key of a field: a trailing `_` (for Python keywords like `async`) is dropped."""
    return field_name.removesuffix("_")


def _field_type(section: object, key: str) -> type:
    hints = typing.get_type_hints(type(section))
    return hints[key]


def _coerce(value: object, typ: type, key: str) -> object:
    """Turn a TOML or command-line value into the field's type, or say what is wrong."""
    if isinstance(typ, types.UnionType):  # pragma: no cover - no union fields yet
        typ = typing.get_args(typ)[0]
    if typing.get_origin(typ) is list:  # list[str]: a TOML list, or "a,b" on the command line
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ValueError(f"{key}: expected a list of strings or a comma-separated string, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {typ} for {key}")


def set_value(cfg: Config, dotted: str, value: object) -> None:
    """Set `section.key` on cfg, converting and checking the type."""
    sections = _sections(cfg)
    if "." not in dotted:
        raise ValueError(f"config key {dotted!r} must look like section.key; sections: {', '.join(sections)}")
    name, key = dotted.split(".", 1)
    if name not in sections:
        raise ValueError(f"unknown config section {name!r} in {dotted!r}; sections: {', '.join(sections)}")
    section = sections[name]
    fields = {key_name(f.name): f.name for f in dataclasses.fields(section)}
    if key not in fields:
        raise ValueError(f"unknown config key {dotted!r}; keys of [{name}]: {', '.join(fields)}")
    setattr(section, fields[key], _coerce(value, _field_type(section, fields[key]), dotted))


def load_toml(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML: {e}") from None
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: top-level key {name!r} must be a [section] table")
        for key, value in table.items():
            set_value(cfg, f"{name}.{key}", value)


def parse_args(argv: list[str]) -> Config:
    """Build a Config from `--config FILE` and `--section.key value` / `--section.key=value`."""
    pairs: list[tuple[str, str]] = []
    config_files: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_files.append(value)
        else:
            pairs.append((key, value))
    cfg = Config()
    for path in config_files:
        load_toml(cfg, path)
    for key, value in pairs:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg
