"""data.layout: iid and contiguous row orders against a reference written out here; resume and
re-balance in both; the held-out set is the same for both and never trained on; the watched
folder's iid (within each shard)."""

import json

import numpy as np
import pytest
import torch

from dilo.comm.protocol import SoloGroup
from dilo.config import Config, parse_args
from dilo.data import ShardedBatches, load_tokens
from dilo.data_stream import WatchedBatches
from dilo.inner_loop import load_data

LAYOUTS = ("iid", "contiguous")
TAG = 0x1A7E  # the layout's seed tag, as documented in ShardedBatches


def positions(n: int) -> np.ndarray:
    """Token i is i, so a window's first token is its offset in the stream."""
    return np.arange(n, dtype=np.uint16)


def reference_starts(n: int, L: int, T: int, count: int, layout: str, seed: int = 0) -> list[int]:
    """Stream offset of global rows 0 .. count - 1, written out from the docstring's recipe.

    contiguous: the stream is cut into L lanes of n // L tokens; row g reads window
    (g // L) mod P of lane g mod L. iid: the rows of epoch e are the contiguous rows of
    that epoch in the order default_rng([TAG, seed, e]).permutation(L * P).
    """
    lane_len = n // L
    P = (lane_len - 1) // T
    in_order = []  # contiguous row r of an epoch -> its offset
    for j in range(P):
        for lane in range(L):
            in_order.append(lane * lane_len + j * T)
    out = []
    for g in range(count):
        e, r = divmod(g, L * P)
        if layout == "iid":
            r = int(np.random.default_rng([TAG, seed, e]).permutation(L * P)[r])
        out.append(in_order[r])
    return out


def make_world(tokens, W: int, B: int, T: int, layout: str, seed: int = 0, state=None):
    world = [ShardedBatches(tokens, w, W, B, T, layout=layout, seed=seed) for w in range(W)]
    for worker in world:
        if state is not None:
            worker.load_state_dict(state)
    return world


def read(world, steps: int) -> list[list[int]]:
    """Lockstep steps of a world; per step the first token of every row, worker by worker."""
    out = []
    for _ in range(steps):
        step = []
        for worker in world:
            x, y = worker.next_batch()
            assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
            step += x[:, 0].tolist()
        out.append(step)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_match_the_reference_across_epochs(layout):
    n, W, B, T, seed = 3_000, 2, 3, 8, 5
    world = make_world(positions(n), W, B, T, layout, seed)
    P = world[0].batches_per_epoch
    steps = 2 * P // 1 + 3  # past two epoch boundaries (L = W * B rows per step)
    got = [s for step in read(world, steps) for s in step]
    assert got == reference_starts(n, W * B, T, len(got), layout, seed)
    assert world[0].epoch == 2


def test_iid_reads_every_window_once_per_epoch_from_the_whole_corpus():
    n, W, B, T = 40_000, 4, 4, 16
    L = W * B
    iid = make_world(positions(n), W, B, T, "iid")
    contiguous = make_world(positions(n), W, B, T, "contiguous")
    P = iid[0].batches_per_epoch
    epoch_iid, epoch_con = read(iid, P), read(contiguous, P)
    flat = sorted(s for step in epoch_iid for s in step)
    assert flat == sorted(s for step in epoch_con for s in step)  # the same windows, each once
    assert len(set(flat)) == L * P
    quarter = n // 4
    for w in range(W):
        mine_iid = [s for step in epoch_iid[:20] for s in step[w * B:(w + 1) * B]]
        mine_con = [s for step in epoch_con for s in step[w * B:(w + 1) * B]]
        # iid: 20 steps of any worker already touch every quarter of the stream;
        # contiguous: a whole epoch of worker w stays inside quarter w
        assert {s // quarter for s in mine_iid} == {0, 1, 2, 3}
        assert {s // quarter for s in mine_con} == {w}
    second = read(iid, P)
    assert sorted(s for step in second for s in step) == flat and second != epoch_iid  # reshuffled
    other_seed = read(make_world(positions(n), W, B, T, "iid", seed=1), P)
    assert other_seed != epoch_iid


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("old_workers, new_workers", [(4, 3), (2, 5), (4, 4)])
def test_resume_and_rebalance_continue_the_global_row_sequence(layout, old_workers, new_workers):
    n, B, T, seed = 6_000, 3, 8, 11
    tokens = positions(n)
    world = make_world(tokens, old_workers, B, T, layout, seed)
    P = world[0].batches_per_epoch
    before = read(world, P // 2 + 40)  # crosses an epoch boundary for the smaller worlds
    state = json.loads(json.dumps(world[1].state_dict()))  # what every worker's checkpoint holds
    read(world, 3)  # the lost round
    new_world = make_world(tokens, new_workers, B, T, layout, seed, state)
    after = read(new_world, 25)
    trained = [s for step in before + after for s in step]
    assert trained == reference_starts(n, old_workers * B, T, len(trained), layout, seed)
    assert new_world[0].global_tokens_consumed == len(trained) * T


def test_a_resume_under_another_layout_or_seed_is_refused():
    tokens = positions(6_000)
    iid = ShardedBatches(tokens, 0, 2, 2, 8, layout="iid", seed=3)
    iid.next_batch()
    with pytest.raises(ValueError, match="data.layout = iid.*--data.layout iid"):
        ShardedBatches(tokens, 0, 2, 2, 8, layout="contiguous").load_state_dict(iid.state_dict())
    with pytest.raises(ValueError, match="run.seed = 3.*--run.seed 3"):
        ShardedBatches(tokens, 0, 2, 2, 8, layout="iid", seed=4).load_state_dict(iid.state_dict())
    old = {k: v for k, v in ShardedBatches(tokens, 0, 2, 2, 8).state_dict().items()
           if k not in ("layout", "seed")}  # written before data.layout: contiguous
    ShardedBatches(tokens, 0, 2, 2, 8, layout="contiguous").load_state_dict(old)
    with pytest.raises(ValueError, match="--data.layout contiguous"):
        ShardedBatches(tokens, 0, 2, 2, 8, layout="iid").load_state_dict(old)
    with pytest.raises(ValueError, match="data.layout"):
        ShardedBatches(tokens, 0, 2, 2, 8, layout="shuffled")


def test_the_config_key_is_checked():
    assert parse_args([]).data.layout in LAYOUTS
    assert parse_args(["--data.layout", "contiguous"]).data.layout == "contiguous"
    with pytest.raises(ValueError, match="data.layout must be one of iid, contiguous"):
        parse_args(["--data.layout", "random"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_held_out_set_is_the_same_for_both_layouts_and_never_trained_on(tmp_path, layout):
    n, W = 60_000, 3
    np.save(tmp_path / "t.npy", positions(n))
    cfg = Config()
    cfg.data.path, cfg.data.val_fraction, cfg.data.layout = str(tmp_path / "t.npy"), 0.25, layout
    cfg.model.vocab_size, cfg.model.seq_len, cfg.data.batch_size = 65536, 16, 4
    _, val = load_tokens(cfg.data.path, 0, 0.25)
    held_out = set(val.tolist())
    trained = set()
    for w in range(W):
        batches, evaluation = load_data(cfg, w, W, 1)
        assert batches.layout == layout
        for _ in range(batches.batches_per_epoch + 2):  # a whole epoch and into the next
            x, y = batches.next_batch()
            trained |= set(x.flatten().tolist()) | set(y.flatten().tolist())
        evaluated = {t for x, y in evaluation for t in x.flatten().tolist() + y.flatten().tolist()}
        assert evaluated <= held_out
    assert not trained & held_out
    assert len(trained) > 0.95 * (n - len(held_out))  # an epoch covers (nearly) all train tokens
    cfg.data.layout = "contiguous"
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evaluation, load_data(cfg, 0, W, 1)[1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_watched_folder_shuffles_within_each_shard_and_resumes(tmp_path, layout):
    T, B = 8, 2
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "a.npy", positions(900))
    np.save(folder / "b.npy", (positions(900) + 1000).astype(np.uint16))
    s = WatchedBatches(str(folder), SoloGroup(), 0, 1, B, T, seed=2, layout=layout)
    L = B
    rows_a = s.shards[0].rows
    got = [x[:, 0].tolist() for x, _ in (s.next_batch() for _ in range(rows_a // B))]
    first_shard = [v for step in got for v in step]
    lane_len = 900 // L
    in_order = [(g % L) * lane_len + (g // L) * T for g in range(rows_a)]
    if layout == "iid":
        assert sorted(first_shard) == sorted(in_order) and first_shard != in_order
    else:
        assert first_shard == in_order
    state = json.loads(json.dumps(s.state_dict()))
    nxt = [s.next_batch()[0] for _ in range(5)]
    assert all(int(x.min()) >= 1000 for x in nxt)  # then shard b, whole
    again = WatchedBatches(str(folder), SoloGroup(), 0, 1, B, T, seed=2, layout=layout)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()[0]) for a in nxt)
    other = "contiguous" if layout == "iid" else "iid"
    with pytest.raises(ValueError, match=f"--data.layout {layout}"):
        WatchedBatches(str(folder), SoloGroup(), 0, 1, B, T, seed=2, layout=other).load_state_dict(state)
