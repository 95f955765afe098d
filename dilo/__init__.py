"""dilo: DiLoCo training across poorly connected islands of compute."""

from dilo.options import CODEC_NAMES

__all__ = ["CODEC_NAMES", "DiLoCo", "SyncStats", "get_codec"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so that `import dilo.config` (the CLI's parsing) stays torch-free.
    if name == "DiLoCo":
        from dilo.diloco import DiLoCo
        return DiLoCo
    if name == "SyncStats":
        from dilo.stats import SyncStats
        return SyncStats
    if name == "get_codec":
        from dilo.codecs import get_codec
        return get_codec
    raise AttributeError(f"module 'dilo' has no attribute {name!r}")
