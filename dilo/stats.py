"""The one stats record: what an outer step did (`SyncStats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SyncStats:
    """What one outer step (of one fragment) did; the training loop logs it."""

    outer_step: int
    seconds: float
    """Wall time of the exchange itself, wherever it ran."""
    bytes_sent: int
    bytes_received: int
    num_peers: int
    global_hash: str
    dropped: int
    codec_error: float
    pseudo_grad_norm: float
    fragment: int = 0
    seconds_exposed: float = 0.0
    """Part of `seconds` the training loop spent waiting for the exchange."""
    seconds_hidden: float = 0.0
    """Part of `seconds` that ran while the worker computed."""
    intra_bytes: int = 0
    """Bytes received from the worker's own other processes (islands), not in bytes_received."""
    adopted: bool = False
    """True when this worker took the group's newer state instead of applying a round."""
