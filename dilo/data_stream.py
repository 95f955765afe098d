"""A watched data folder: shards that keep arriving, read by every worker in one agreed order.

With `data.watch = true`, `data.path` names a folder. Each file in it (recursively; hidden
files and names ending in `.tmp`/`.part` are ignored; write a file elsewhere, or under a
hidden or `.tmp` name, then rename it in) is one shard: UTF-8 text (its bytes are the
tokens) or a uint16 token file (.npy, .bin). Shards join the stream in name order
(POSIX path relative to the folder); a file whose name sorts before a shard already
taken is ignored (logged), so name new files so that they sort last (e.g. a timestamp).

Agreement. Files appear at different moments on different machines, so no worker takes
a shard on its own: at every outer-step boundary, and whenever the stream runs dry
(which happens at the same inner step on every worker: the position is global), every
process of the world sends the (name, size) of the files it sees (`Group.all_gather_object`
on the world group) and the shards taken are those past the last taken name that every
process sees with the same size, in name order. Every worker thus takes the same shards
at the same step, and the content's sha256 goes into the manifest. On a swarm
(comm.backend = hivemind, `attach_swarm`) the same rule runs through each round's group:
every member sends its list with its join, the leader answers the intersection, and the
members take those shards at that outer boundary; between rounds nothing is taken (a
stream that runs dry mid-round repeats, hence data.when_idle = repeat there).

Reading. Each shard's tokens are split like a fixed dataset (every k-th 4096-token block to
validation, k = round(1 / data.val_fraction); a shard too short for one block is all train)
and its train tokens are cut into the run's L lanes, exactly as `ShardedBatches` cuts a
fixed stream (docs/design.md): row g of a shard is window g // L of lane g mod L, one step of
a world of W workers reads rows [G, G + W*F), worker w its F rows from G + w*F. A shard
whose remaining rows cannot fill a step is left and the next shard starts at row 0.
With `data.layout = iid` a shard's rows are read in an order shuffled by (run seed, the
shard's sha256): iid within each shard; shards still join in name order.

Replay (`data.replay` r): R_n = floor((n+1)·r·B) − floor(n·r·B) of a worker's B rows at
step n (r·B per step on average; the same R_n on every worker) come from older shards (those before the current one), chosen by a generator seeded with (run seed, step,
worker slot): shard in proportion to its rows, then a row. The other F = B - R are fresh.
With no older shard yet, all B are fresh.

When every taken shard is consumed: `data.when_idle = wait` polls the folder (the same
agreement, once a second, logged every 30 s) until a new shard appears; `repeat` starts
another pass over the shards taken so far and jumps to a new shard as soon as one is
taken. A stop request while waiting finishes the round with repeated rows, so the run
stops at the next outer step as usual.

Manifest (`state_dict`): every shard taken (name, bytes, sha256, rows) and the cursor
(shard, row within it, pass, steps), so a resumed run continues exactly where the
checkpoint was, and a resume refuses a shard whose content changed. A swarm donor serves
the manifest of the outer step whose θ it sends, so a joiner continues where the swarm is.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dilo.comm.protocol import Group
from dilo.data import LAYOUT_TAG, check_layout, eval_batches, load_tokens

logger = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part")
BOUNDARIES_KEPT = 8
"""Manifests of recent outer steps a swarm peer keeps to serve with its state."""


def visible_files(folder: Path) -> list[tuple[str, int]]:
    """(name relative to the folder, size in bytes) of the shard files there, in name order."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or rel.endswith(IGNORED_SUFFIXES):
            continue
        if p.is_file():
            out.append((rel, p.stat().st_size))
    return sorted(out)


def agreed_new(seen_by_all: list[list[tuple[str, int]]], last: str) -> list[tuple[str, int]]:
    """Files past `last` that every process sees with the same size, in name order."""
    common = set(seen_by_all[0])
    for seen in seen_by_all[1:]:
        common &= set(seen)
    return sorted(f for f in common if f[0] > last)


class Shard:
    """One taken file: its train tokens cut into lanes, its validation tokens."""

    def __init__(self, folder: Path, name: str, val_fraction: float, num_lanes: int, seq_len: int,
                 layout: str = "contiguous", seed: int = 0):
        path = folder / name
        raw = path.read_bytes()
        self.name, self.bytes, self.sha256 = name, len(raw), hashlib.sha256(raw).hexdigest()
        try:
            train, self.val = load_tokens(str(path), 0, val_fraction)
        except ValueError:  # too short for the split: all train (a bad file raises again here)
            try:
                train, self.val = load_tokens(str(path), 0, 0.0)
            except ValueError as e:
                logger.warning("data: shard %s skipped: %s", name, e)
                train, self.val = np.empty(0, np.uint16), np.empty(0, np.uint16)
        self.max_token = int(train.max()) if train.size else 0
        lane_len = train.size // num_lanes
        self.windows = max(0, (lane_len - 1) // seq_len) if lane_len else 0
        self.lanes = train[:num_lanes * lane_len].reshape(num_lanes, lane_len)
        self.rows = num_lanes * self.windows
        self.order = None if layout == "contiguous" else np.random.default_rng(
            [LAYOUT_TAG, seed % 2**64, int(self.sha256[:15], 16)]).permutation(self.rows)

    def record(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256, "rows": self.rows}

    def take_rows(self, g: np.ndarray, seq_len: int) -> np.ndarray:
        L = self.lanes.shape[0]
        g = g if self.order is None else self.order[g]
        start = (g // L) * seq_len
        return self.lanes[(g % L)[:, None], start[:, None] + np.arange(seq_len + 1)]


class WatchedBatches:
    """`ShardedBatches`' interface (next_batch, position, state_dict, ...) over a watched folder."""

    def __init__(self, folder: str, group: Group, shard: int, num_shards: int, batch_size: int,
                 seq_len: int, val_fraction: float = 0.0, replay: float = 0.0,
                 when_idle: str = "wait", seed: int = 0, vocab_size: int = 65536,
                 stop_requested: Callable[[], bool] = lambda: False, poll_s: float = 1.0,
                 layout: str = "contiguous"):
        self.folder, self.group = Path(folder), group
        self.shard, self.num_shards = shard, num_shards
        self.batch_size, self.seq_len = batch_size, seq_len
        self.val_fraction, self.when_idle, self.seed = val_fraction, when_idle, seed
        self.replay, self.layout = replay, layout
        self.vocab_size, self.stop_requested, self.poll_s = vocab_size, stop_requested, poll_s
        self.num_lanes = num_shards * batch_size
        self.shards: list[Shard] = []
        self.cursor = 0       # index of the shard being read
        self.position = 0     # rows of that shard the world has read (G)
        self.passes = 0       # repeat passes over the taken shards (when_idle = repeat)
        self.repeating = False  # reading a repeat pass (a new shard ends it)
        self.steps = 0        # steps the world has read
        self.batch_index = 0  # batches this worker slot drew
        self.tokens_seen = 0  # x tokens the whole world read
        self.changed = False  # shards were taken since the last `take_changed()`
        self._warned: set[str] = set()
        self.feed: Callable[[], list | None] | None = None
        """On a swarm (`attach_swarm`): the new files the last round agreed on, once, else None."""
        self._boundaries: dict[int, dict] = {}  # outer step -> manifest there (served to joiners)
        while not self.shards:
            if not self.sync() and not self._wait_once("the first shard"):
                raise ValueError(f"data.watch: stopped before any shard appeared in {folder}")

    # -- agreement ----------------------------------------------------------------------
    def sync(self) -> bool:
        """Take the shards every process sees (a collective on the world group; on a swarm the
        list its last round agreed on, see `attach_swarm`); True if any."""
        last = self.shards[-1].name if self.shards else ""
        if self.feed is not None:
            agreed = self.feed()  # None between rounds: a swarm agrees only at a round
            new = sorted((str(n), int(size)) for n, size in agreed or [] if n > last)
            seen = [visible_files(self.folder)]
        else:
            seen = self.group.all_gather_object(visible_files(self.folder))
            new = agreed_new(seen, last)
        for name, _ in seen[0]:
            if name <= last and name not in self._warned and name not in {s.name for s in self.shards}:
                self._warned.add(name)
                logger.warning("data: %s sorts before the last shard taken (%s); ignored: name new "
                               "files so that they sort last", name, last)
        for name, _ in new:
            self._take(Shard(self.folder, name, self.val_fraction, self.num_lanes, self.seq_len,
                             self.layout, self.seed))
        if new and self.repeating:  # leave the repeat pass for the new data at once
            self.cursor, self.position, self.repeating = len(self.shards) - len(new), 0, False
        return bool(new)

    def _take(self, s: Shard) -> None:
        if s.max_token >= self.vocab_size:
            raise ValueError(f"data.path shard {s.name} holds token id {s.max_token} but "
                             f"model.vocab_size is {self.vocab_size}; raise model.vocab_size")
        self.shards.append(s)
        self.changed = True
        logger.info("data: shard %d taken: %s (%d bytes, %d rows) after %d steps", len(self.shards) - 1,
                    s.name, s.bytes, s.rows, self.steps)

    def _wait_once(self, what: str) -> bool:
        """Poll until a shard is agreed; False if a stop was requested (on any process)."""
        start = last_log = time.monotonic()
        logger.info("data: waiting for %s in %s", what, self.folder)
        while True:
            stop = any(self.group.all_gather_object(bool(self.stop_requested())))
            if stop:
                return False
            time.sleep(self.poll_s)
            if self.sync():
                return True
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                logger.info("data: still waiting for new data in %s (%.0f s)", self.folder,
                            time.monotonic() - start)

    # -- reading ------------------------------------------------------------------------
    @property
    def fresh_rows(self) -> int:
        """B − R_n at step n: R_n = ⌊(n+1)·r·B⌋ − ⌊n·r·B⌋ replayed rows (0 on the first shard),
        so the replayed share is r·B per step on average even when r·B is not a whole number."""
        if self.cursor == 0 or not self.replay:
            return self.batch_size
        rb = self.replay * self.batch_size
        return self.batch_size - (math.floor((self.steps + 1) * rb) - math.floor(self.steps * rb))

    def _advance_to_room(self) -> None:
        """Move the cursor to a shard with a step's fresh rows left (waiting or repeating)."""
        while True:
            need = self.num_shards * self.fresh_rows
            if self.cursor < len(self.shards) and self.position + need <= self.shards[self.cursor].rows:
                return
            if self.cursor + 1 < len(self.shards):
                self.cursor, self.position = self.cursor + 1, 0
                continue
            if self.sync():
                continue
            if self.when_idle == "wait" and self._wait_once("a new shard"):
                continue
            if not any(s.rows >= self.num_shards * self.batch_size for s in self.shards):
                raise ValueError(
                    f"data.watch: no shard in {self.folder} holds a step's rows ({self.num_shards} "
                    f"workers x batch {self.batch_size} x (seq_len {self.seq_len} + 1) tokens) and "
                    "no new one arrives; add bigger files, or lower batch_size or seq_len")
            self.passes += 1  # repeat: another pass over what was taken
            self.cursor, self.position, self.repeating = 0, 0, True
            logger.info("data: every shard consumed; pass %d over the %d shards taken",
                        self.passes, len(self.shards))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._advance_to_room()
        F, T = self.fresh_rows, self.seq_len
        g = self.position + self.shard * F + np.arange(F)
        parts = [self.shards[self.cursor].take_rows(g, T)]
        if F < self.batch_size:
            parts.append(self._replay(self.batch_size - F))
        rows = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        self.position += self.num_shards * F
        self.steps += 1
        self.batch_index += 1
        self.tokens_seen += self.num_shards * self.batch_size * T
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _replay(self, count: int) -> np.ndarray:
        """`count` rows from the shards before the current one, by (seed, step, slot)."""
        older = self.shards[:self.cursor]
        weights = np.array([s.rows for s in older], dtype=np.float64)
        rng = np.random.default_rng([self.seed, self.steps, self.shard])
        which = rng.choice(len(older), size=count, p=weights / weights.sum())
        out = [older[i].take_rows(rng.integers(0, older[i].rows, size=1), self.seq_len) for i in which]
        return np.concatenate(out)

    # -- the interface train.py and the report read -------------------------------------
    @property
    def epoch(self) -> int:
        return self.passes

    @property
    def tokens_consumed(self) -> int:
        return self.batch_index * self.batch_size * self.seq_len

    @property
    def global_tokens_consumed(self) -> int:
        return self.tokens_seen

    def eval_set(self, batch_size: int, num_batches: int) -> list:
        """Batches over the validation blocks of every shard taken (train tokens if none)."""
        val = [s.val for s in self.shards if s.val.size]
        tokens = np.concatenate(val) if val else np.concatenate([s.lanes.reshape(-1) for s in self.shards])
        return eval_batches(tokens, batch_size, self.seq_len, num_batches)

    def take_changed(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    def state_dict(self) -> dict:
        """The consumed-data manifest: every shard taken and where the world is."""
        return {"kind": "watched", "folder": str(self.folder), "num_lanes": self.num_lanes,
                "seq_len": self.seq_len, "shard": self.shard, "num_shards": self.num_shards,
                "batch_size": self.batch_size, "shards": [s.record() for s in self.shards],
                "cursor": self.cursor, "position": self.position, "passes": self.passes,
                "repeating": self.repeating, "layout": self.layout, "seed": self.seed,
                "steps": self.steps, "batch_index": self.batch_index, "tokens_seen": self.tokens_seen}

    # -- the swarm: agreement through the rounds, the manifest through the joiner's download --
    def offer(self) -> dict:
        """This peer's proposal for its next round: the files it sees past the last shard taken."""
        last = self.shards[-1].name if self.shards else ""
        return {"last": last, "files": [[n, size] for n, size in visible_files(self.folder) if n > last]}

    def mark_boundary(self, outer_step: int) -> None:
        """Remember the manifest at this outer step (after its shards were taken)."""
        self._boundaries[outer_step] = {**self.state_dict(), "outer_step": outer_step}
        for old in sorted(self._boundaries)[:-BOUNDARIES_KEPT]:
            self._boundaries.pop(old, None)

    def boundary_state(self, outer_step: int, wait_s: float = 30.0) -> dict | None:
        """The manifest at `outer_step` (any thread): what a donor serves with that step's θ.
        Waits for the training thread to reach that boundary (θ is applied just before)."""
        deadline = time.monotonic() + wait_s
        while (state := self._boundaries.get(outer_step)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return state

    def adopt(self, state: dict | None, outer_step: int) -> None:
        """This swarm peer adopted the global state of `outer_step` (it joined, fell behind, or was
        repaired): continue at that state's manifest, exactly where the swarm is."""
        if state is None or int(state.get("outer_step", -1)) != outer_step:
            raise RuntimeError(f"data.watch: the adopted state of outer step {outer_step} came with the "
                               f"manifest of {None if state is None else state.get('outer_step')}")
        own = self.batch_index
        self.load_state_dict(state)
        self.batch_index = own  # batches this slot drew (the donor's count is the donor's)
        if self.feed is not None:
            self.feed()  # a round this peer ran before adopting agreed for a state it left
        self._boundaries.clear()
        self.mark_boundary(outer_step)

    def load_state_dict(self, state: dict) -> None:
        """Continue at the manifest's cursor with exactly its shards (content checked)."""
        if state.get("kind") != "watched":
            raise ValueError("the checkpoint's data state is not a watched folder's; resume with "
                             "the run's data.watch setting")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"data position was saved with seq_len {state['seq_len']}, this "
                             f"run has {self.seq_len}; the token windows would not line up")
        check_layout(state, self.layout, self.seed)
        self.num_lanes = int(state["num_lanes"])
        shards = []
        for rec in state["shards"]:
            path = self.folder / rec["name"]
            if not path.is_file():
                raise ValueError(f"data.watch: the checkpoint's shard {rec['name']} is gone from "
                                 f"{self.folder}; restore it to resume")
            s = Shard(self.folder, rec["name"], self.val_fraction, self.num_lanes, self.seq_len,
                      self.layout, self.seed)
            if s.sha256 != rec["sha256"]:
                raise ValueError(f"data.watch: shard {rec['name']} changed since the checkpoint "
                                 "(sha256 differs); shards must not be edited once taken")
            shards.append(s)
        self.shards = shards
        for key in ("cursor", "position", "passes", "steps", "batch_index", "tokens_seen"):
            setattr(self, key, int(state[key]))
        self.repeating = bool(state["repeating"])
        self.changed = True


def attach_swarm(batches: WatchedBatches, swarm) -> None:
    """data.watch on comm.backend = hivemind: a peer offers the files it sees with its join of
    every round, the round's leader answers the intersection of the members' offers (the
    torch agreement, through the round's group: dilo/comm/swarm_round.py), and each member
    takes those shards at that outer boundary; a donor serves its manifest with its state."""
    batches.feed = swarm.take_agreed
    swarm.data_offer = batches.offer
    swarm.transfer.data_at = batches.boundary_state
    batches.mark_boundary(0)
