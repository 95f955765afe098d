"""The outer loop's options and their one validation (torch-free: config parsing imports it).

`check_outer_options` is called by the CLI's config validation (dilo/config.py, with
the config's values) and by `dilo.DiLoCo` (with its keywords): one set of rules, one
set of messages. Each message names the config key (e.g. `outer.fragments`), then the
keyword of `dilo.DiLoCo` that sets the same option, so it reads right from either side.
"""

from __future__ import annotations

import math

OVERLAPS = ("none", "delayed", "eager")
"""`outer.overlap` / `overlap=`: when an exchange is applied (docs/streaming.md)."""
DIGEST_MODES = ("step", "background")
"""`outer.digest` / `digest=`: when the global hash is computed (dilo/global_hash.py)."""
CODEC_NAMES = ("fp32", "bf16", "fp16", "int8", "fp4", "int2", "sparse")
"""`comm.codec` / `codec=`: the wire formats of dilo/codecs.py."""
LOSSLESS_CODECS = ("fp32",)
VALUE_BITS = (2, 4, 8)
"""`comm.value_bits`: bits per kept value of the sparse codec (a sign bit and a magnitude code)."""
MAX_SPARSE_BLOCK = 1 << 16
SPARSE_EXCHANGES = ("gather", "two_phase")
"""`comm.sparse_exchange`: all-gather of the sparse contributions, or the two-phase exchange whose
owners re-sparsify their chunk's mean (docs/codecs.md)."""
AGGREGATES = ("mean", "trimmed_mean", "median", "clip")
"""`outer.aggregate` / `aggregate=`: the chunk owner's rule (dilo/aggregate.py, docs/robust.md);
"auto" picks `default_aggregate(open_membership)`."""
WEIGHTINGS = ("equal", "tokens")
"""`outer.weighting` / `weighting=`: how the owner weights the members' Δ (docs/uneven.md)."""
EXCHANGE_PIECES = 8
"""`comm.pieces`' default: pieces per owner chunk of the two-phase exchange (dilo/comm/two_phase.py),
chosen by measurement (docs/results.md, issue 12's fourth pass)."""
MAX_PIECES = 64


def check_digest(digest: str) -> None:
    """Raise ValueError unless `digest` is a valid `outer.digest`."""
    if digest not in DIGEST_MODES:
        raise ValueError(f"outer.digest must be one of {', '.join(DIGEST_MODES)}, got {digest!r}")


def check_pieces(pieces: int) -> None:
    """Raise ValueError unless `pieces` is a valid `comm.pieces`."""
    if isinstance(pieces, bool) or not isinstance(pieces, int) or not 1 <= pieces <= MAX_PIECES:
        raise ValueError(f"comm.pieces must be an integer in [1, {MAX_PIECES}] (pieces per owner chunk the "
                         f"two-phase exchange pipelines; 1 = none), got {pieces!r}")


def default_aggregate(open_membership: bool) -> str:
    """`auto`: mean in a fixed group (torch: a trusted cluster, where a broken worker's Inf/NaN is
    already dropped and mean loses nothing); trimmed_mean in an open swarm (hivemind: anyone with
    the run key can send, and one peer's ×1000 Δ must not move θ)."""
    return "trimmed_mean" if open_membership else "mean"


def check_aggregate(aggregate: str, trim: int, clip_ratio: float, size: int | None = None,
                    open_membership: bool = False, weighting: str = "equal") -> None:
    """Raise ValueError for an aggregation rule that cannot run; `size`: a fixed group's members."""
    if weighting not in WEIGHTINGS:
        _refuse(f"outer.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}", "weighting")
    rule = default_aggregate(open_membership) if aggregate == "auto" else aggregate
    if weighting == "tokens" and rule not in ("mean", "clip"):
        _refuse(f"outer.weighting = tokens needs outer.aggregate = mean or clip (a weighted order statistic "
                f"is not implemented, and a liar could claim many tokens); got {rule}"
                f"{' (auto with comm.backend = hivemind)' if aggregate == 'auto' else ''}", "weighting", "aggregate")
    if aggregate != "auto" and aggregate not in AGGREGATES:
        _refuse(f"outer.aggregate must be auto or one of {', '.join(AGGREGATES)}, got {aggregate!r}", "aggregate")
    if not (isinstance(trim, int) and trim >= 1):
        _refuse(f"outer.trim (k of trimmed_mean) must be an integer >= 1, got {trim!r}", "trim")
    if not (isinstance(clip_ratio, (int, float)) and math.isfinite(clip_ratio) and clip_ratio >= 1.0):
        _refuse(f"outer.clip_ratio (r of clip) must be a finite number >= 1, got {clip_ratio!r}", "clip_ratio")
    if aggregate == "clip" and open_membership:
        _refuse("outer.aggregate = clip needs a fixed group (its norms are gathered before phase 1); "
                "with comm.backend = hivemind use trimmed_mean or median", "aggregate")
    if aggregate == "trimmed_mean" and size is not None and size > 1 and 2 * trim >= size:
        _refuse(f"outer.trim = {trim} drops 2 × {trim} of the {size} workers' values per coordinate, "
                f"leaving none; use outer.trim <= {(size - 1) // 2} or more workers "
                "(a swarm, whose rounds vary in size, clamps k instead)", "trim")


def check_outer_options(*, inner_steps: int, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                        nesterov: bool = True, fragments: int = 1, delay: int = 0, alpha: float = 0.0,
                        overlap: str = "none", error_feedback: bool = False, codec: str = "int8",
                        codec_lossless: bool | None = None, ef_decay: float = 1.0) -> None:
    """Raise ValueError for outer/comm options DiLoCo cannot run (the keywords are DiLoCo's).

    `codec` is a codec's name; `codec_lossless` says whether it is exact (default: looked
    up among the built-in codecs, for a user's own codec object pass its `lossless`).
    """
    if inner_steps == 0 and (fragments, delay, overlap) != (1, 0, "none"):
        _refuse("rounds ended by the caller (outer.inner_steps = 0: outer.sync_every_seconds or "
                "outer.target_tokens) need outer.fragments = 1, outer.delay = 0 and outer.overlap = none: "
                "streaming and overlap schedule their exchanges at fixed inner steps of a round of H steps",
                "inner_steps", "fragments", "delay", "overlap")
    if inner_steps < 0:
        _refuse(f"outer.inner_steps (H) must be >= 1 (or 0 with outer.sync_every_seconds or "
                f"outer.target_tokens), got {inner_steps}", "inner_steps")
    if inner_steps == 0:
        inner_steps = 1  # (the rest of the checks read one step per round)
    if not (outer_lr > 0 and math.isfinite(outer_lr)):
        _refuse(f"outer.lr must be > 0 and finite, got {outer_lr}", "outer_lr")
    if not 0.0 <= outer_momentum < 1.0:
        _refuse(f"outer.momentum must be in [0, 1), got {outer_momentum}", "outer_momentum")
    if nesterov and outer_momentum == 0:
        _refuse("outer.nesterov = true needs outer.momentum > 0; set outer.nesterov = false or a momentum",
                "nesterov", "outer_momentum")
    if fragments < 1:
        _refuse(f"outer.fragments (P) must be >= 1, got {fragments}", "fragments")
    if inner_steps % fragments:
        _refuse(f"outer.fragments ({fragments}) must divide outer.inner_steps ({inner_steps}): one "
                "fragment is exchanged every inner_steps / fragments steps", "fragments", "inner_steps")
    stride = inner_steps // fragments
    if not 0 <= delay < stride:
        _refuse(f"outer.delay (τ) = {delay} must be >= 0 and < outer.inner_steps / outer.fragments "
                f"({inner_steps} / {fragments} = {stride}), so one fragment is in flight at a time",
                "delay", "inner_steps", "fragments")
    if not 0.0 <= alpha <= 1.0:
        _refuse(f"outer.alpha must be in [0, 1], got {alpha}", "alpha")
    if overlap not in OVERLAPS:
        _refuse(f"outer.overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}", "overlap")
    lossless = codec in LOSSLESS_CODECS if codec_lossless is None else codec_lossless
    if error_feedback and lossless:
        lossy = ", ".join(n for n in CODEC_NAMES if n not in LOSSLESS_CODECS)
        _refuse(f"comm.error_feedback = true needs a lossy comm.codec ({lossy}); {codec} loses nothing",
                "error_feedback", "codec")
    if not (isinstance(ef_decay, (int, float)) and 0.0 < ef_decay <= 1.0):
        _refuse(f"comm.ef_decay (β) must be in (0, 1], got {ef_decay!r}", "ef_decay")


def check_owner_feedback(owner_feedback: bool, *, error_feedback: bool, codec: str, exchange: str,
                         codec_lossless: bool | None = None, codec_needs_error_feedback: bool | None = None) -> None:
    """Raise ValueError where `comm.owner_feedback` cannot act (docs/codecs.md).

    It adds what a chunk owner's re-encode of the mean lost to the owner's error-feedback
    residual: it needs a lossy codec, error feedback, and the two-phase exchange (whose owners
    re-encode). `codec` is a codec's name, `exchange` its `Codec.exchange`; `codec_lossless` and
    `codec_needs_error_feedback` default to the built-in codec of that name (pass a user
    codec's attributes). A lone worker, which exchanges nothing, is not refused here.
    """
    if not owner_feedback:
        return
    lossless = codec in LOSSLESS_CODECS if codec_lossless is None else codec_lossless
    needs_ef = codec == "sparse" if codec_needs_error_feedback is None else codec_needs_error_feedback
    if lossless:
        lossy = ", ".join(n for n in CODEC_NAMES if n not in LOSSLESS_CODECS)
        _refuse(f"comm.owner_feedback = true has nothing to send again: comm.codec = {codec} loses nothing; "
                f"use a lossy codec ({lossy}) with error feedback, or comm.owner_feedback = false",
                "owner_feedback", "codec")
    if exchange != "two_phase":
        _refuse(f"comm.owner_feedback = true needs the two-phase exchange, whose chunk owners re-encode the "
                f"mean; comm.codec = {codec} is exchanged by {exchange} (every worker decodes every worker's "
                f"bytes: nothing is re-encoded); set comm.sparse_exchange = two_phase or "
                "comm.owner_feedback = false", "owner_feedback", "codec")
    if not (error_feedback or needs_ef):
        _refuse(f"comm.owner_feedback = true adds the owners' re-encode loss to their error-feedback residual, "
                f"and comm.codec = {codec} runs without error feedback; set comm.error_feedback = true or "
                "comm.owner_feedback = false", "owner_feedback", "error_feedback")


def check_sparse_options(density: float, value_bits: int, sparse_block: int, exchange: str = "gather") -> None:
    """Raise ValueError for sparse-codec settings it cannot run (dilo/codec_lowbit.py)."""
    if not (isinstance(sparse_block, int) and 2 <= sparse_block <= MAX_SPARSE_BLOCK):
        raise ValueError(f"comm.sparse_block must be an integer in [2, {MAX_SPARSE_BLOCK}] (elements per "
                         f"top-k block; offsets are packed in its bit length), got {sparse_block!r}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"comm.density must be in (0, 1] (the fraction of each block the sparse codec "
                         f"keeps, e.g. 0.02), got {density!r}")
    if value_bits not in VALUE_BITS:
        raise ValueError(f"comm.value_bits must be one of {', '.join(map(str, VALUE_BITS))} (bits per kept "
                         f"value: a sign and a magnitude code), got {value_bits!r}")
    if exchange not in SPARSE_EXCHANGES:
        raise ValueError(f"comm.sparse_exchange must be one of {', '.join(SPARSE_EXCHANGES)}, got {exchange!r}")


def overlap_max_stable_lr(overlap: str, members: int, outer_momentum: float, nesterov: bool) -> float:
    """The largest outer lr at which the outer iteration is stable on the quadratic model of
    docs/streaming.md ("Why momentum costs"), or inf when the overlap mode has no such bound.

    Model: along a direction of curvature, a round's pseudo-gradient is c·(start − optimum),
    c ∈ (0, 1] (how far H inner steps get). `delayed` steps θ with the previous round's Δ;
    `eager`, with M workers alike, with Δ^(t)/M + (1 − 1/M)·Δ^(t−1). Stable means every root
    of the iteration's characteristic cubic lies inside the unit circle for every c (Jury's
    test on a grid of c, then bisection on the lr)."""
    if overlap not in ("delayed", "eager"):
        return math.inf
    fresh = 0.0 if overlap == "delayed" else 1.0 / max(1, members)
    grid = [i / 200 for i in range(1, 201)]

    def stable(lr: float) -> bool:
        return all(_stable_cubic(lr * c, outer_momentum, nesterov, fresh) for c in grid)

    lo, hi = 0.0, 4.0
    if stable(hi):
        return math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


_MEASURED = {"delayed": "2.1x core DiLoCo's eval loss", "eager": "1.7x"}
"""What the unstable setting cost (docs/results/overlap.json: lr 0.7, Nesterov 0.9, M = 4, 100 outer steps)."""


OVERLAP_MIN_INNER_STEPS = 100
"""`outer.inner_steps` below which dilo warns that `outer.overlap delayed|eager` costs quality even inside
the lr bound: the staleness of one round (docs/streaming.md, "Staleness against H")."""
_EAGER_BY_H = ("1.18x at H = 20, 1.095x at H = 50 (6000 inner steps; 1.063x at 12000), "
               "1.052x at H = 100 (12000)")
"""Eager ÷ core DiLoCo's final eval loss, 4 workers, both with Nesterov 0.5 at lr 0.7 (inside the bound), seed 0
(docs/results/overlap_6000.json, overlap_6000_h50.json, overlap_12000_h50.json, overlap_12000_h100.json)."""


OVERLAP_DAMPED_SHARE = 0.85
"""Share of `overlap_max_stable_lr` above which dilo warns that the outer iteration, though stable,
rings: its stiffest directions decay by only a few % per round, so the noise of every round adds up
in them and the run ends at a random phase of the swing (docs/streaming.md, "Eager's outer lr")."""
_DAMPED = ("eager ÷ core DiLoCo with the same optimizer, 4 workers, H = 100, 120 outer steps, Nesterov 0.5, bound "
           "0.77: 1.052x at lr 0.7 (0.91 of the bound; seed 0), 1.026x at 0.6 (0.78), 1.031x at 0.5 (seeds 0-2), "
           "1.056x at 0.4 (seed 0); 2 workers, Nesterov 0.9, bound 0.78, 240 outer steps, ÷ core at lr 0.7: "
           "1.011x at lr 0.4 (0.51 of the bound), 1.030x at 0.5 (seeds 0-2)")
"""The measurement behind the warning (docs/results/overlap_12000_h100_lr.json, overlap_12000_h100_seeds.json,
overlap_24000_h100_m2.json)."""


def overlap_warning(overlap: str, members: int, outer_lr: float, outer_momentum: float,
                    nesterov: bool, inner_steps: int | None = None) -> str | None:
    """The warning for an overlap mode whose outer lr is past `overlap_max_stable_lr` (or within
    `OVERLAP_DAMPED_SHARE` of it), and (given `inner_steps`) for one whose rounds are shorter than
    `OVERLAP_MIN_INNER_STEPS`; None if neither."""
    found = []
    limit = overlap_max_stable_lr(overlap, members, outer_momentum, nesterov)
    optimizer = f"outer.lr {outer_lr:g} and {'Nesterov ' if nesterov else ''}momentum {outer_momentum:g}"
    if outer_lr > limit:
        found.append(f"outer.overlap = {overlap} with {members} workers, {optimizer}: the one-round delay makes the "
                     f"outer iteration oscillate unless outer.lr <= {limit:.2f} (docs/streaming.md; measured at "
                     f"lr 0.7, momentum 0.9, 4 workers: {_MEASURED[overlap]} after 100 outer steps); lower "
                     "outer.lr or outer.momentum")
    elif outer_lr > OVERLAP_DAMPED_SHARE * limit:
        found.append(f"outer.overlap = {overlap} with {members} workers, {optimizer}: stable (bound {limit:.2f}) "
                     f"but barely damped, so the outer iteration swings from round to round and the final model "
                     f"lands anywhere on the swing ({_DAMPED}; docs/streaming.md); use outer.lr <= "
                     f"{OVERLAP_DAMPED_SHARE * limit:.2f}; the best measured were 0.5-0.8 of the bound "
                     f"({0.5 * limit:.2f}-{0.8 * limit:.2f})")
    if overlap in ("delayed", "eager") and members > 1 and inner_steps and inner_steps < OVERLAP_MIN_INNER_STEPS:
        missing = "all" if overlap == "delayed" else f"{members - 1}/{members}"
        found.append(f"outer.overlap = {overlap} with {members} workers and outer.inner_steps {inner_steps}: "
                     f"every round starts without {missing} of the last round's averaged progress, which "
                     f"costs quality even inside the lr bound, the more the shorter the rounds and the run "
                     f"(eager ÷ core DiLoCo's eval loss, 4 workers: {_EAGER_BY_H}; docs/streaming.md); to hide "
                     "exchanges without a round of staleness use outer.overlap none with outer.fragments and "
                     "outer.delay (Streaming DiLoCo: each exchange runs behind τ inner steps), or use "
                     f"outer.inner_steps >= {OVERLAP_MIN_INNER_STEPS}, where the cost was smallest")
    return ". Also: ".join(found) or None


def _stable_cubic(k: float, mu: float, nesterov: bool, a: float) -> bool:
    """Jury's test for z³ + a2·z² + a1·z + a0, the characteristic polynomial of
    e_{t+1} = e_t − step(g_t), g_t = k·(a·e_t + (1 − a)·e_{t−1}), SGD momentum μ (Nesterov or not)."""
    if nesterov:
        a2 = -(1 + mu) + k * a * (1 + mu)
        a1 = mu + k * ((1 - a) * (1 + mu) - a * mu)
        a0 = -k * (1 - a) * mu
    else:
        a2, a1, a0 = -(1 + mu) + k * a, mu + k * (1 - a), 0.0
    return (1 + a2 + a1 + a0 > 0 and 1 - a2 + a1 - a0 > 0 and abs(a0) < 1
            and abs(a0 * a0 - 1) > abs(a0 * a2 - a1))


def _refuse(message: str, *keywords: str) -> None:
    """Raise the config key's message, naming DiLoCo's keywords too."""
    raise ValueError(f"{message} (DiLoCo keyword{'s' if len(keywords) > 1 else ''}: {', '.join(keywords)})")
