"""Token streams, the train/validation split, and per-worker shards.

Every DiLoCo worker trains a byte-level model on its own disjoint shard of one token
stream. This module turns ``data.path`` into that stream and cuts it up:

Sources (``data.path``):
  * ``""`` (default): the ``.py`` sources of the running Python's standard library,
    which exist on every machine with Python (see :func:`embedded_corpus_files`).
  * a text file, a directory (all files, recursively) or a glob pattern: the raw bytes
    are the tokens (0..255). Files in a directory or glob are read in sorted order and
    joined with ``b"\\n"``; those that are not UTF-8 or contain NUL bytes are skipped
    (a single named file that is not text is an error).
  * a ``.npy`` file (1-D, integer, values in 0..65535) or a ``.bin`` file (raw
    little-endian uint16, as written by nanoGPT); a directory or glob that holds only
    such files is their concatenation, in sorted order.
  Text sources stop at ``data.max_bytes`` bytes (0 = no limit); token files are not cut.

Validation split: the stream is cut into consecutive blocks of 4096 tokens and every
k-th block (k = round(1 / val_fraction); blocks k-1, 2k-1, ...) goes to validation, so
validation is spread over the whole stream rather than taken from its tail.

Sharding: the train stream is cut into lanes that the world reads as one global row
sequence; a worker's share is its slice of each step's rows, so any number of workers can
continue a run where another number left it; see :class:`ShardedBatches`.

Layout (``data.layout``): ``iid`` (the default) shuffles that row sequence with the run seed,
a new permutation every epoch, so every worker's batch is a uniform draw from the whole
corpus (as data-parallel's global batch is); ``contiguous`` reads it in order, so worker w
of the world that started the run trains on a contiguous share of the stream (files sorted
by path: shards that differ in kind). Validation is split off before either, so the
held-out blocks are the same for both layouts and never reach training.
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import pathlib
import sysconfig

import numpy as np
import torch

from dilo.config_checks import LAYOUTS

logger = logging.getLogger(__name__)

VAL_BLOCK_TOKENS = 4096
TOKEN_SUFFIXES = (".npy", ".bin")
LAYOUT_TAG = 0x1A7E  # keeps the layout's random stream apart from other uses of run.seed
# Directories of the standard library left out of the embedded corpus: installed
# packages, test suites (incl. lib2to3's test data), the IDLE GUI, bytecode caches, and
# `encodings` (machine-generated codec tables, 1.4 MB of hex literals).
EMBEDDED_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "idle_test",
     "__pycache__", "encodings"}
)


def _is_text(raw: bytes, complete: bool = True) -> bool:
    """UTF-8 without NUL bytes; ``complete=False`` allows a cut multi-byte tail."""
    if b"\0" in raw:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=complete)
    except UnicodeDecodeError:
        return False
    return True


def embedded_corpus_files() -> list[pathlib.Path]:
    """The standard-library ``.py`` files that make up the default corpus, in order.

    All ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, recursively, minus the
    directories in ``EMBEDDED_EXCLUDED_DIRS`` and files that are not valid UTF-8 (or hold
    NUL bytes), sorted by path relative to the stdlib root (POSIX string order).
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EMBEDDED_EXCLUDED_DIRS]
        files += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return [p for p in files if _is_text(p.read_bytes())]


def _text_tokens(files: list[pathlib.Path], max_bytes: int, path: str = "") -> np.ndarray:
    """Concatenate the text files among ``files`` with b"\\n", cut at ``max_bytes``.

    Only the bytes within the budget are read (and checked), so a huge file is cheap.
    A single explicitly named file that is not text raises instead of being skipped.
    """
    parts, size = [], 0
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read(max_bytes - size if max_bytes else -1)
            complete = not max_bytes or not fh.read(1)
        if not _is_text(raw, complete):
            if len(files) == 1:
                raise ValueError(f"data.path={path!r} is not UTF-8 text (or holds NUL "
                                 "bytes); token files must end in .npy or .bin")
            logger.debug("data: skipping %s (not UTF-8 text)", f)
            continue
        if parts:
            parts.append(b"\n")
        parts.append(raw)
        size += len(raw) + 1
        if max_bytes and size >= max_bytes:
            break
    blob = b"".join(parts)
    if max_bytes:
        blob = blob[:max_bytes]
    return np.frombuffer(blob, dtype=np.uint8).astype(np.uint16)


def _token_file(f: pathlib.Path, path: str) -> np.ndarray:
    """Load one .npy (1-D integer, 0..65535) or .bin (little-endian uint16) file."""
    if f.suffix == ".bin":
        if f.stat().st_size % 2:
            raise ValueError(f"data.path={path!r}: {f} has an odd number of bytes; a .bin "
                             "file must hold raw little-endian uint16 tokens")
        return np.fromfile(f, dtype="<u2").astype(np.uint16)
    arr = np.load(f, allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"data.path={path!r}: {f} has shape {arr.shape} and dtype "
                         f"{arr.dtype}; a .npy token file must be a 1-D integer array")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"data.path={path!r}: {f} holds token ids outside 0..65535 "
                         f"(min {arr.min()}, max {arr.max()}); they must fit in uint16")
    return arr.astype(np.uint16)


def _list_files(path: str) -> list[pathlib.Path]:
    """Files named by ``path`` (a file, a directory or a glob), sorted; [] if none."""
    if any(c in path for c in "*?["):
        matches = [pathlib.Path(m) for m in sorted(glob.glob(path, recursive=True))]
    else:
        matches = [pathlib.Path(path)] if os.path.exists(path) else []
    files = []
    for m in matches:
        if m.is_dir():
            files += sorted((p for p in m.rglob("*") if p.is_file()),
                            key=lambda p: p.relative_to(m).as_posix())
        elif m.is_file():
            files.append(m)
    return files


def _stream(path: str, max_bytes: int) -> np.ndarray:
    if not path:
        return _text_tokens(embedded_corpus_files(), max_bytes)
    files = _list_files(path)
    if not files:
        raise ValueError(f"data.path={path!r} does not exist or matches no files; set "
                         "data.path to a text file, directory, glob, .npy or .bin file "
                         "(or to \"\" for the embedded default corpus)")
    token_files = [f for f in files if f.suffix in TOKEN_SUFFIXES]
    if token_files and len(token_files) != len(files):
        raise ValueError(f"data.path={path!r} mixes token files ({token_files[0]}) and "
                         "other files; point data.path at one kind only (e.g. a glob)")
    if token_files:
        return np.concatenate([_token_file(f, path) for f in token_files])
    return _text_tokens(files, max_bytes, path)


def load_tokens(path: str, max_bytes: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(train_tokens, val_tokens)``, 1-D ``np.uint16`` arrays.

    Sources, byte budget and the every-k-th-block-of-4096 split are described in the
    module docstring. Deterministic for the same inputs on the same machine. Raises ``ValueError`` naming
    ``data.path`` when the path is missing, matches nothing, yields no tokens or holds a
    malformed token file, and naming ``data.val_fraction`` when that is outside [0, 0.5]
    or the stream is too short to give it even one validation block.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 0.5] "
                         "(0 disables validation)")
    if max_bytes < 0:
        raise ValueError(f"data.max_bytes={max_bytes} must be >= 0 (0 = no limit)")
    tokens = _stream(path, max_bytes)
    if tokens.size == 0:
        raise ValueError(f"data.path={path!r} gave no tokens (empty files, or no UTF-8 "
                         "text files); point data.path at non-empty data")
    if val_fraction == 0:
        return tokens, np.empty(0, dtype=np.uint16)
    k = round(1 / val_fraction)
    n, bt = tokens.size, VAL_BLOCK_TOKENS
    if n <= (k - 1) * bt:
        raise ValueError(
            f"data.val_fraction={val_fraction} sends every {k}th block of {bt} tokens to "
            f"validation, but data.path={path!r} gave only {n} tokens; need more than "
            f"{(k - 1) * bt}. Raise data.max_bytes or use more data, or raise "
            "data.val_fraction (0 disables validation)")
    group = k * bt  # k-1 train blocks, then one validation block
    train = [tokens[s:s + group - bt] for s in range(0, n, group)]
    val = [tokens[s + group - bt:s + group] for s in range(0, n, group)]
    return np.concatenate(train), np.concatenate(val)


def check_vocab(splits: dict[str, np.ndarray], vocab_size: int) -> None:
    """Refuse, before training starts, a split that holds a token id >= ``vocab_size``
    (the embedding lookup would fail mid-run, e.g. at the first evaluation)."""
    for name, tokens in splits.items():
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(f"data.path: the {name} split holds token id {int(tokens.max())} but "
                             f"model.vocab_size is {vocab_size}; raise model.vocab_size to at least "
                             f"{int(tokens.max()) + 1}")


class ShardedBatches:
    """Endless ``(x, y)`` batches for one worker; the whole world reads one global row sequence.

    Lanes. The train stream is cut into ``num_lanes`` contiguous equal lanes (L; the
    remainder is dropped). L is fixed for the life of a run: ``num_shards * batch_size`` of
    the world that started it, carried in every checkpoint. Lane l holds the windows
    ``lane[j*T : j*T + T + 1]``, j = 0 .. P - 1 (P = ``batches_per_epoch``); x is the first
    T tokens of a window, y the last T.

    The global row sequence. Row g is window ``(g // L) mod P`` of lane ``g mod L``: rows visit
    the lanes round-robin, so every lane is read front to back and wraps to its start after
    P windows (a new epoch).

    Who reads what. One inner step of a world of W workers reads rows [G, G + W*B): worker w
    takes rows ``G + w*B .. G + w*B + B - 1`` as its batch, then every worker advances G by
    W*B. The position G is a single global counter, the same on every worker at every step.
    In the world that started the run (W*B = L) worker w reads only lanes w*B .. w*B + B - 1,
    i.e. its own contiguous shard of the stream cut into B lanes: the classic DiLoCo layout
    of disjoint shards.

    Re-balance rule (workers joined or left). A world of any size continues from a
    checkpoint's G with its own W and the run's L. The model state in that checkpoint was
    trained on exactly rows [0, G); rows that the old world read after it are read again
    (they were lost together with the work they fed: the in-flight round), and no row is
    read twice or skipped otherwise until the lanes wrap. With W*B != L a worker's rows are
    no longer one contiguous shard: they move over the lanes round-robin, B at a time.

    Layout. The above is ``layout="contiguous"``. With ``layout="iid"`` the rows of each
    epoch are the same E = L * P windows in another order: row g (epoch e = g // E) is
    contiguous row ``e * E + perm_e[g mod E]``, where ``perm_e`` is
    ``numpy.random.default_rng([LAYOUT_TAG, seed mod 2**64, e]).permutation(E)``. Every
    step thus reads W*B windows drawn without replacement from the whole train stream, and
    every epoch reads each window once. The row sequence is still a function of g alone,
    so resume and re-balance are exactly as above.
    """

    def __init__(self, tokens: np.ndarray, shard: int, num_shards: int, batch_size: int,
                 seq_len: int, num_lanes: int = 0, layout: str = "contiguous", seed: int = 0):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout, self.seed = layout, seed
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        self._tokens = tokens
        self.shard, self.num_shards = shard, num_shards
        self.batch_size, self.seq_len = batch_size, seq_len
        self._cut_lanes(num_lanes or num_shards * batch_size)
        self.position = 0
        """Rows the whole world has read (G)."""
        self.batch_index = 0
        """Batches this worker slot has drawn over the run (for token counts)."""

    def _cut_lanes(self, num_lanes: int) -> None:
        needed = num_lanes * (self.seq_len + 1)
        if self._tokens.size < needed:
            raise ValueError(
                f"too little training data: {num_lanes // self.batch_size} workers x batch_size "
                f"{self.batch_size} x (seq_len {self.seq_len} + 1) needs {needed} train tokens, "
                f"have {self._tokens.size}. Raise data.max_bytes (or point data.path at more "
                "data), or lower batch_size, seq_len or the number of workers")
        lane_len = self._tokens.size // num_lanes
        self._lanes = self._tokens[:num_lanes * lane_len].reshape(num_lanes, lane_len)
        self.num_lanes = num_lanes
        self.batches_per_epoch = (lane_len - 1) // self.seq_len
        self._orders: dict[int, np.ndarray] = {}  # epoch -> perm_e (iid), the last two

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([LAYOUT_TAG, self.seed % 2**64, epoch])
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = rng.permutation(self.num_lanes * self.batches_per_epoch)
        return self._orders[epoch]

    def _shuffled(self, g: np.ndarray) -> np.ndarray:
        """iid: global rows -> the contiguous rows they read (see the class docstring)."""
        size = self.num_lanes * self.batches_per_epoch
        epoch, out = g // size, np.empty_like(g)
        for e in np.unique(epoch):
            here = epoch == e
            out[here] = e * size + self._epoch_order(int(e))[g[here] % size]
        return out

    @property
    def epoch(self) -> int:
        """Complete passes of the whole world over the lanes."""
        return self.position // (self.num_lanes * self.batches_per_epoch)

    @property
    def tokens_consumed(self) -> int:
        """Number of x tokens this worker slot returned (batch_size * seq_len per batch)."""
        return self.batch_index * self.batch_size * self.seq_len

    @property
    def global_tokens_consumed(self) -> int:
        """Number of x tokens the whole world read (rows [0, position))."""
        return self.position * self.seq_len

    def rows(self, first: int, count: int) -> np.ndarray:
        """Global rows ``first .. first + count - 1`` as a ``[count, T + 1]`` token array."""
        L, P, T = self.num_lanes, self.batches_per_epoch, self.seq_len
        g = first + np.arange(count)
        if self.layout == "iid":
            g = self._shuffled(g)
        start = ((g // L) % P) * T
        return self._lanes[(g % L)[:, None], start[:, None] + np.arange(T + 1)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``, both int64 ``[batch_size, seq_len]``, y = x shifted by one."""
        B = self.batch_size
        rows = torch.from_numpy(self.rows(self.position + self.shard * B, B).astype(np.int64))
        self.position += self.num_shards * B
        self.batch_index += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """Plain ints and the layout. ``position``, ``num_lanes``, ``layout`` and ``seed`` are
        global (the same on every worker); ``batch_index`` counts this slot's batches; the
        rest is for the log."""
        return {"position": self.position, "num_lanes": self.num_lanes,
                "batch_index": self.batch_index, "shard": self.shard,
                "num_shards": self.num_shards, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "layout": self.layout, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the global row sequence at ``state["position"]``, whatever world wrote it.

        A different number of workers or batch size re-balances by the rule in the class
        docstring; a different seq_len cannot continue (the windows differ).
        """
        if "position" not in state:
            raise ValueError("data state has no global position (written by an older dilo); "
                             "start a new run, or use checkpoint.init_from to keep the weights")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"data position was saved with seq_len {state['seq_len']}, this "
                             f"run has {self.seq_len}; the token windows would not line up")
        check_layout(state, self.layout, self.seed)
        if state["num_lanes"] != self.num_lanes:
            self._cut_lanes(int(state["num_lanes"]))
        if (state["num_shards"], state["batch_size"]) != (self.num_shards, self.batch_size):
            logger.info("data: re-balanced from %d workers x batch %d to %d x %d; the world "
                        "continues at global row %d of %d lanes", state["num_shards"],
                        state["batch_size"], self.num_shards, self.batch_size,
                        state["position"], self.num_lanes)
        self.position = int(state["position"])
        self.batch_index = int(state["batch_index"])


def check_layout(state: dict, layout: str, seed: int) -> None:
    """Refuse to continue a data position saved under another data.layout (or, for iid,
    another run.seed): the rows after it would be other rows. States from before
    data.layout existed were contiguous."""
    saved = state.get("layout", "contiguous")
    if saved != layout:
        raise ValueError(f"data position was saved with data.layout = {saved}, this run has {layout}; "
                         f"resume with --data.layout {saved}")
    if layout == "iid" and int(state.get("seed", seed)) != seed:
        raise ValueError(f"data position was saved with run.seed = {state['seed']} (data.layout = iid "
                         f"orders rows by it), this run has {seed}; resume with --run.seed {state['seed']}")


def eval_batches(val_tokens: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches, identical on every worker.

    ``num_batches * batch_size`` windows of ``seq_len + 1`` tokens, evenly spaced from
    the start to the end of the validation stream and non-overlapping. ``num_batches``
    is clipped to what the stream holds, but at least one batch is returned (its windows
    may then overlap). An empty stream (validation off) gives ``[]``; a non-empty one
    shorter than ``seq_len + 1`` raises ``ValueError``.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1")
    n, w = val_tokens.size, seq_len + 1
    if n == 0:
        return []
    if n < w:
        raise ValueError(f"validation stream has {n} tokens, fewer than seq_len + 1 = {w}; "
                         "raise data.val_fraction or data.max_bytes, or lower seq_len")
    num_batches = max(1, min(num_batches, n // w // batch_size))
    num_windows = num_batches * batch_size
    # Evenly spaced starts from 0 to n - w; non-overlapping whenever num_windows * w <= n.
    starts = np.arange(num_windows) * (n - w) // max(num_windows - 1, 1)
    windows = torch.from_numpy(np.stack([val_tokens[s:s + w] for s in starts]).astype(np.int64))
    return [(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
            for rows in windows.split(batch_size)]
