"""The one stats record: what an outer step did (`SyncStats`) and the run's totals.

The fields are declared once, here. The JSONL `sync` line is `sync_record(stats)`, the
per-run totals accumulate from the record (`RunTotals.add`), and the summary's traffic
keys come from `RunTotals.summary()`; a field added here reaches all three.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SyncStats:
    """What one outer step (of one fragment) did; the training loop logs it."""

    outer_step: int
    seconds: float
    """Wall time of the exchange itself, wherever it ran."""
    bytes_sent: int
    bytes_received: int
    num_peers: int = field(metadata={"key": "peers"})
    global_hash: str
    dropped: int
    codec_error: float
    """‖mean − decode(encode(mean))‖ / ‖mean‖ over the chunk this worker owns (sums of squares in
    fp64, from the pass that forms the difference: dilo/codec_kernels.py)."""
    pseudo_grad_norm: float
    """‖Δ_m‖ of this worker's pseudo-gradient (fp64 sum of squares from the pass that forms Δ;
    torch's norm without numba)."""
    fragment: int = 0
    seconds_exposed: float = 0.0
    """Part of `seconds` the training loop spent waiting for the exchange."""
    seconds_hidden: float = 0.0
    """Part of `seconds` that ran while the worker computed."""
    intra_bytes: int = 0
    """Bytes received from the worker's own other processes (islands), not in bytes_received."""
    adopted: bool = False
    """True when this worker took the group's newer state instead of applying a round."""
    apply_seconds: float = 0.0
    """Wall time of the outer step on θ after the exchange (finiteness check, SGD, buffers)."""
    digest_seconds: float = 0.0
    """Wall time of the global hash and its confirmation with the group (queued, when the
    exchanges run in the background; with outer.digest = background: handing the state to the
    digest thread and confirming the previous state's digest)."""
    hash_step: int = 0
    """The outer step whose state `global_hash` digests: this one, or with outer.digest =
    background the one before (-1 and an empty hash at the first outer step)."""
    skipped: int = 0
    """1 when no valid contribution arrived for part of Δ: θ and momentum were left unchanged."""
    clipped: int = 0
    """Contributions scaled down by outer.aggregate = clip (counted on every member)."""
    reset_residuals: int = 0
    """Error-feedback residuals reset to zero (non-finite, or their Δ + e was withheld)."""
    withheld: int = 0
    """This worker's own pseudo-gradients sent as "no contribution" (non-finite or out of range)."""
    outer_state_bytes: int = 0
    """Host bytes of this process's θ, outer momentum and error-feedback residual after the step."""
    rejected: list = field(default_factory=list, metadata={"key": None})
    """(member, reason) of the contributions this worker dropped as owner (not in the JSONL)."""
    clipped_members: list = field(default_factory=list, metadata={"key": None})
    """(member, factor) of the clipped contributions (not in the JSONL)."""
    # Rounds by time or tokens, weighted contributions (docs/uneven.md); 0 when the members
    # sent no round reports (outer.weighting = equal with rounds of H steps).
    round_tokens: float = 0.0
    """Tokens this worker trained on in the round (its report)."""
    round_steps: float = 0.0
    """Inner steps this worker took in the round."""
    group_tokens: float = 0.0
    """Tokens of every member's round together."""
    group_steps: float = 0.0
    """Inner steps of every member's round together (the group's progress, docs/uneven.md)."""
    weight: float = 0.0
    """This worker's share of the average: its tokens / the group's (weighting = tokens), else 1 / members."""
    idle_seconds: float = 0.0
    """Seconds this worker waited at the exchange for the last member to reach it (from the
    members' reported compute time in the round)."""


def round_fields(reports: list, rank: int, weighting: str) -> dict:
    """The round fields of `SyncStats` from an exchange's reports (tokens, steps, ready seconds)."""
    if not reports or not 0 <= rank < len(reports):
        return {}
    tokens, steps, ready = reports[rank]
    group_tokens = sum(r[0] for r in reports)
    share = tokens / group_tokens if weighting == "tokens" and group_tokens > 0 else 1.0 / len(reports)
    return {"round_tokens": tokens, "round_steps": steps, "group_tokens": group_tokens,
            "group_steps": sum(r[1] for r in reports), "weight": share,
            "idle_seconds": max(0.0, max(r[2] for r in reports) - ready)}


def sync_record(stats: SyncStats) -> dict:
    """The fields of the JSONL `sync` line (num_peers is spelled `peers` there)."""
    return {f.metadata.get("key", f.name): getattr(stats, f.name) for f in fields(stats)
            if f.metadata.get("key", f.name) is not None}


@dataclass
class RunTotals:
    """Sums over a run's outer steps (restored from a checkpoint on resume).

    A field's `summary` metadata is its key in summary-<worker>.json (None: not in it).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    syncs: int = field(default=0, metadata={"summary": None})
    sync_seconds: float = 0.0
    dropped: int = field(default=0, metadata={"summary": "dropped_contributions"})
    intra_bytes: int = 0
    peak_sync_bytes: int = 0
    """The largest bytes_sent of one outer step."""
    sync_seconds_hidden: float = 0.0
    sync_seconds_exposed: float = 0.0
    outer_apply_seconds: float = 0.0
    """Sum of the outer steps' `apply_seconds`."""
    digest_seconds: float = 0.0
    """Sum of the outer steps' `digest_seconds`."""
    clipped: int = field(default=0, metadata={"summary": "clipped_contributions"})
    skipped: int = field(default=0, metadata={"summary": "skipped_outer_steps"})
    reset_residuals: int = 0
    withheld: int = field(default=0, metadata={"summary": "withheld_contributions"})
    progress: float = 0.0
    """The group's progress: the sum over the outer steps of `group_steps` / members (mean inner
    steps per worker); rounds by time or tokens read their LR schedule and their end from it."""
    group_tokens: float = 0.0
    idle_seconds: float = 0.0
    """Sum of the outer steps' `idle_seconds`."""

    def add(self, stats: SyncStats) -> None:
        self.bytes_sent += stats.bytes_sent
        self.bytes_received += stats.bytes_received
        self.syncs += 1
        self.sync_seconds += stats.seconds
        self.dropped += stats.dropped
        self.intra_bytes += stats.intra_bytes
        self.peak_sync_bytes = max(self.peak_sync_bytes, stats.bytes_sent)
        self.sync_seconds_hidden += stats.seconds_hidden
        self.sync_seconds_exposed += stats.seconds_exposed
        self.outer_apply_seconds += stats.apply_seconds
        self.digest_seconds += stats.digest_seconds
        self.clipped += stats.clipped
        self.skipped += stats.skipped
        self.reset_residuals += stats.reset_residuals
        self.withheld += stats.withheld
        self.progress += stats.group_steps / stats.num_peers if stats.group_steps else 0.0
        self.group_tokens += stats.group_tokens
        self.idle_seconds += stats.idle_seconds

    def to_dict(self) -> dict:
        """The checkpoint's `totals` (the field names)."""
        return asdict(self)

    def load(self, saved: dict) -> None:
        """Take the values of a checkpoint's `totals`."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])

    def summary(self) -> dict:
        """The totals' keys and values in summary-<worker>.json."""
        out = {}
        for f in fields(self):
            key = f.metadata.get("summary", f.name)
            if key is not None:
                out[key] = getattr(self, f.name)
        return out
