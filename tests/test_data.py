"""Tests for dilo.data: sources, the validation split, shards, resume, eval batches."""

import numpy as np
import pytest
import torch

from dilo.data import (
    VAL_BLOCK_TOKENS,
    ShardedBatches,
    embedded_corpus_files,
    eval_batches,
    load_tokens,
)


def positions(n: int) -> np.ndarray:
    """A stream whose token i is i (n <= 65536), so values identify offsets."""
    assert n <= 65536
    return np.arange(n, dtype=np.uint16)


def all_values(batches: ShardedBatches, num_batches: int) -> set[int]:
    seen = set()
    for _ in range(num_batches):
        x, y = batches.next_batch()
        seen.update(x.flatten().tolist())
        seen.update(y.flatten().tolist())
    return seen


# --- the embedded default corpus ---------------------------------------------------


def test_embedded_corpus_loads_deterministic_and_plausible():
    files = embedded_corpus_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(part in {"site-packages", "test", "tests", "idlelib"}
                   for f in files for part in f.parts)
    train, val = load_tokens("", 1_000_000, 0.05)
    train2, val2 = load_tokens("", 1_000_000, 0.05)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert train.size + val.size == 1_000_000
    assert 0.03 < val.size / 1_000_000 < 0.07
    tokens = np.concatenate([train, val])
    assert tokens.max() < 256
    p = np.bincount(tokens, minlength=256) / tokens.size
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert 2.5 < entropy < 4.5


def test_max_bytes_limits_text():
    train, val = load_tokens("", 50_000, 0.0)
    assert train.size == 50_000 and val.size == 0


# --- user data sources ----------------------------------------------------------------


def test_text_file_directory_and_glob(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("world é")
    (tmp_path / "sub" / "blob.dat").write_bytes(b"\x00\x01\xff")  # not text: skipped
    train, _ = load_tokens(str(tmp_path / "a.txt"), 0, 0.0)
    assert bytes(train.astype(np.uint8)) == b"hello\n"
    train, _ = load_tokens(str(tmp_path), 0, 0.0)
    assert bytes(train.astype(np.uint8)) == b"hello\n\n" + "world é".encode()
    train, _ = load_tokens(str(tmp_path / "**" / "*.txt"), 0, 0.0)
    assert bytes(train.astype(np.uint8)) == b"hello\n\n" + "world é".encode()
    train, _ = load_tokens(str(tmp_path), 8, 0.0)
    assert bytes(train.astype(np.uint8)) == b"hello\n\nw"


def test_npy_and_bin(tmp_path):
    tokens = (np.arange(10_000) * 7 % 50_000).astype(np.int64)
    np.save(tmp_path / "t.npy", tokens)
    tokens.astype("<u2").tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        train, val = load_tokens(str(tmp_path / name), 0, 0.0)
        assert train.dtype == np.uint16 and val.size == 0
        assert np.array_equal(train, tokens)
    # a directory of token files is their concatenation
    (tmp_path / "t.npy").unlink()
    tokens.astype("<u2").tofile(tmp_path / "u.bin")
    train, _ = load_tokens(str(tmp_path), 0, 0.0)
    assert np.array_equal(train, np.concatenate([tokens, tokens]))


@pytest.mark.parametrize("make, key", [
    (lambda p: str(p / "missing.txt"), "data.path"),
    (lambda p: str(p / "*.nothing"), "data.path"),
    (lambda p: (np.save(p / "x.npy", np.zeros((4, 4), np.int32)), str(p / "x.npy"))[1],
     "data.path"),
    (lambda p: (np.save(p / "x.npy", np.array([1, 70_000])), str(p / "x.npy"))[1],
     "data.path"),
    (lambda p: (np.save(p / "x.npy", np.ones(8, np.float32)), str(p / "x.npy"))[1],
     "data.path"),
    (lambda p: ((p / "x.bin").write_bytes(b"abc"), str(p / "x.bin"))[1], "data.path"),
    (lambda p: ((p / "x.txt").write_bytes(b""), str(p / "x.txt"))[1], "data.path"),
])
def test_bad_sources_raise(tmp_path, make, key):
    with pytest.raises(ValueError, match=key):
        load_tokens(make(tmp_path), 0, 0.0)


def test_bad_val_fraction_raises(tmp_path):
    np.save(tmp_path / "t.npy", positions(50_000))
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError, match="data.val_fraction"):
            load_tokens(str(tmp_path / "t.npy"), 0, bad)
    with pytest.raises(ValueError, match="data.val_fraction"):  # too short for 1 val block
        load_tokens(str(tmp_path / "t.npy"), 0, 0.05)


def test_too_little_data_raises():
    with pytest.raises(ValueError, match=r"needs 4128 train tokens, have 4000.*data.max_bytes"):
        ShardedBatches(positions(4000), shard=0, num_shards=4, batch_size=8, seq_len=128)


# --- validation split and sharding -------------------------------------------------


def test_val_blocks_spread_and_disjoint_from_train(tmp_path):
    n = 60_000
    np.save(tmp_path / "t.npy", positions(n))
    train, val = load_tokens(str(tmp_path / "t.npy"), 0, 0.25)  # k = 4
    block = np.arange(n) // VAL_BLOCK_TOKENS
    assert np.array_equal(val, np.flatnonzero(block % 4 == 3))
    assert np.array_equal(train, np.flatnonzero(block % 4 != 3))
    assert val.max() > 0.75 * n  # spread over the whole stream, not only its tail
    assert val.min() < 0.25 * n


def test_shards_disjoint_and_cover_only_train(tmp_path):
    np.save(tmp_path / "t.npy", positions(60_000))
    train, val = load_tokens(str(tmp_path / "t.npy"), 0, 0.25)
    num_shards, batch_size, seq_len = 3, 4, 16
    covered = []
    for shard in range(num_shards):
        b = ShardedBatches(train, shard, num_shards, batch_size, seq_len)
        covered.append(all_values(b, b.batches_per_epoch))
        # each shard covers nearly all of its 1/num_shards share (lane tails are dropped)
        assert len(covered[-1]) > 0.95 * train.size / num_shards
    for i in range(num_shards):
        assert covered[i] <= set(train.tolist())
        assert not covered[i] & set(val.tolist())
        for j in range(i + 1, num_shards):
            assert not covered[i] & covered[j]


def test_batches_shapes_shift_and_lanes():
    b = ShardedBatches(positions(10_000), shard=1, num_shards=2, batch_size=4, seq_len=8)
    x, y = b.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    # shard 1 starts at 5000, lanes of 1250 tokens
    assert x[:, 0].tolist() == [5000, 6250, 7500, 8750]
    x2, _ = b.next_batch()
    assert torch.equal(x2, x + 8)
    assert b.tokens_consumed == 2 * 4 * 8


def test_resume_gives_identical_batches_and_wraps():
    tokens = positions(2_000)
    a = ShardedBatches(tokens, shard=0, num_shards=2, batch_size=2, seq_len=10)
    assert a.batches_per_epoch == (500 - 1) // 10
    first = a.next_batch()
    for _ in range(a.batches_per_epoch + 5):  # past the end of the lanes
        a.next_batch()
    assert a.epoch == 1
    state = a.state_dict()
    assert all(type(v) is int for k, v in state.items() if k != "layout")
    expected = [a.next_batch() for _ in range(60)]
    b = ShardedBatches(tokens, shard=0, num_shards=2, batch_size=2, seq_len=10)
    b.load_state_dict(state)
    for (x, y), (ex, ey) in zip((b.next_batch() for _ in range(60)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert b.tokens_consumed == a.tokens_consumed
    # wrap-around: batch index batches_per_epoch is batch 0 again
    c = ShardedBatches(tokens, shard=0, num_shards=2, batch_size=2, seq_len=10)
    c.load_state_dict({**c.state_dict(), "position": c.batches_per_epoch * c.num_lanes})
    x, y = c.next_batch()
    assert torch.equal(x, first[0]) and torch.equal(y, first[1])


def test_state_dict_survives_weights_only_load(tmp_path):
    b = ShardedBatches(positions(2_000), shard=0, num_shards=1, batch_size=2, seq_len=10)
    b.next_batch()
    torch.save(b.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == b.state_dict()


# --- re-balance to a new world size ------------------------------------------------


def read_windows(world: list[ShardedBatches], steps: int) -> list[list[int]]:
    """Run `steps` lockstep inner steps of a world; per step, the first token of every row."""
    out = []
    for _ in range(steps):
        step = []
        for worker in world:
            x, y = worker.next_batch()
            assert torch.equal(y[:, :-1], x[:, 1:])
            step += x[:, 0].tolist()
        out.append(step)
    return out


def make_world(tokens, num_workers: int, batch_size: int, seq_len: int, state=None):
    world = [ShardedBatches(tokens, w, num_workers, batch_size, seq_len) for w in range(num_workers)]
    if state is not None:
        for worker in world:
            worker.load_state_dict(state)
    return world


def round_robin_starts(n_tokens: int, num_lanes: int, seq_len: int, count: int) -> list[int]:
    """Reference order written out: lanes visited in turn, each read front to back."""
    lane_len = n_tokens // num_lanes
    per_lane = (lane_len - 1) // seq_len
    starts, j = [], 0
    while len(starts) < count:
        for lane in range(num_lanes):
            starts.append(lane * lane_len + (j % per_lane) * seq_len)
        j += 1
    return starts[:count]


@pytest.mark.parametrize("old_workers, new_workers", [(4, 3), (4, 2), (2, 5), (3, 4)])
def test_rebalance_after_shrink_or_grow_repeats_only_the_lost_round(old_workers, new_workers):
    n, B, T = 30_000, 3, 8
    tokens = positions(n)
    world = make_world(tokens, old_workers, B, T)
    before = read_windows(world, 7)
    checkpoint = world[0].state_dict()  # the state every worker saved at this outer step
    assert all(w.state_dict()["position"] == checkpoint["position"] for w in world)
    lost = read_windows(world, 4)  # in flight when a worker died: thrown away with its work
    new_world = make_world(tokens, new_workers, B, T, checkpoint)
    assert all(w.num_lanes == old_workers * B for w in new_world)
    after = read_windows(new_world, 20)

    trained = [s for step in before + after for s in step]
    assert len(set(trained)) == len(trained), "a row was read twice"
    assert trained[:len(flat := [s for step in before for s in step])] == flat
    # exactly the prefix of the global round-robin order: nothing skipped, nothing repeated
    want = round_robin_starts(n, old_workers * B, T, len(trained))
    assert trained == want
    # the rows of the lost round are read again, once, by the new world
    redone = [s for step in lost for s in step]
    assert [s for step in after for s in step][:len(redone)] == redone
    # every worker of the new world gets B rows per step, none shared within a step
    for step in after:
        assert len(step) == new_workers * B == len(set(step))
    assert new_world[0].global_tokens_consumed == (7 * old_workers + 20 * new_workers) * B * T


def test_same_world_resume_is_exact_and_grow_back_keeps_lanes():
    tokens, B, T = positions(20_000), 2, 8
    world = make_world(tokens, 4, B, T)
    read_windows(world, 5)
    state = world[2].state_dict()
    expected = read_windows(world, 6)
    assert read_windows(make_world(tokens, 4, B, T, state), 6) == expected
    # 4 -> 2 -> 4: back at full size, worker w again reads lanes w*B .. w*B+B-1
    small = make_world(tokens, 2, B, T, state)
    read_windows(small, 2)  # 2 steps of 2 workers = 1 step of 4: lanes line up again
    full = make_world(tokens, 4, B, T, small[0].state_dict())
    lane_len = 20_000 // 8
    for step in read_windows(full, 3):
        assert [s // lane_len for s in step] == list(range(8))


def test_load_refuses_other_seq_len_and_old_format():
    tokens = positions(20_000)
    state = ShardedBatches(tokens, 0, 2, 2, 8).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        ShardedBatches(tokens, 0, 2, 2, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="global position"):
        ShardedBatches(tokens, 0, 2, 2, 8).load_state_dict({"batch_index": 3})


# --- eval batches --------------------------------------------------------------------


def test_eval_batches_deterministic_spread_and_clipped():
    val = positions(10_000)
    batches = eval_batches(val, batch_size=4, seq_len=32, num_batches=5)
    again = eval_batches(val, batch_size=4, seq_len=32, num_batches=5)
    assert len(batches) == 5
    starts = []
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(y[:, :-1], x[:, 1:])
        starts += x[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] == 10_000 - 33  # whole stream, head to tail
    assert all(b - a >= 33 for a, b in zip(starts, starts[1:]))  # non-overlapping
    # clipped to what fits (10_000 // 33 // 4 = 75), but at least one batch
    assert len(eval_batches(val, 4, 32, 1000)) == 75
    assert len(eval_batches(positions(40), 4, 32, 3)) == 1
    assert eval_batches(np.empty(0, np.uint16), 4, 32, 3) == []
    with pytest.raises(ValueError, match="seq_len"):
        eval_batches(positions(20), 4, 32, 3)


# --- token ids against model.vocab_size, every split, before training --------------


def test_token_id_beyond_vocab_in_the_validation_split_refused_at_start(tmp_path):
    from dilo.config import Config
    from dilo.inner_loop import load_data

    tokens = np.full(4 * VAL_BLOCK_TOKENS, 7, dtype=np.uint16)
    tokens[-VAL_BLOCK_TOKENS:] = 300  # with val_fraction 0.25 the 4th block is validation only
    np.save(tmp_path / "t.npy", tokens)
    cfg = Config()
    cfg.data.path, cfg.data.val_fraction, cfg.model.vocab_size = str(tmp_path / "t.npy"), 0.25, 256
    train, val = load_tokens(cfg.data.path, 0, 0.25)
    assert int(train.max()) == 7 and int(val.max()) == 300
    with pytest.raises(ValueError, match=r"validation split holds token id 300 .* raise "
                                         r"model.vocab_size to at least 301"):
        load_data(cfg, 0, 1, 1)
    cfg.model.vocab_size = 301
    batches, evaluation = load_data(cfg, 0, 1, 1)
    assert evaluation and int(evaluation[0][0].max()) == 300
