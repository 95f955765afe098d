"""dilo: DiLoCo training across poorly connected islands of compute."""

from dilo.codecs import CODEC_NAMES, get_codec
from dilo.diloco import DiLoCo, SyncStats

__all__ = ["CODEC_NAMES", "DiLoCo", "SyncStats", "get_codec"]
__version__ = "0.1.0"
