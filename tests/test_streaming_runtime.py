"""Streaming/overlap machinery: bit-identity with the classic path, the background exchange,
exact resume with exchanges in flight, fragment assignment and refused settings."""

from __future__ import annotations

import io
import threading
import time

import blake3
import pytest
import torch
import torch.nn as nn

from dilo import DiLoCo
from dilo.comm.local import local_groups
from dilo.comm.protocol import Group
from dilo.config import ModelConfig, parse_args
from dilo.fragments import assign_fragments
from dilo.model import GPT
from tests.helpers import REPO, Net, adamw, inner_step, run_workers


class CoreDiLoCo:
    """The core algorithm's outer loop as it was before streaming (commit de66ff7), verbatim in
    its arithmetic: one flat θ, one SGD, exchange every H steps, buffers averaged, hash."""

    def __init__(self, model, opt, H, group, codec):
        self.model, self.H, self.group, self.codec = model, H, group, codec
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        flat = self.flat()
        group.broadcast(flat, src=0)
        self.theta = nn.Parameter(flat, requires_grad=False)
        self.outer = torch.optim.SGD([self.theta], lr=0.7, momentum=0.9, nesterov=True)
        self.inner_step = self.outer_step = 0
        self.copy_to_model()
        self.sync_buffers()

    def flat(self):
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])

    @torch.no_grad()
    def copy_to_model(self):
        offset = 0
        for p in self.params:
            p.copy_(self.theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def sync_buffers(self):
        from dilo.codecs import get_codec
        flat = torch.cat([b.reshape(-1).to("cpu", torch.float32) for b in self.buffers])
        mean = self.group.average(flat, get_codec("fp32")).average
        offset = 0
        for b in self.buffers:
            b.copy_(mean[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    def step(self):
        self.inner_step += 1
        return self.sync() if self.inner_step % self.H == 0 else None

    @torch.no_grad()
    def sync(self):
        from dilo.codecs import get_codec
        result = self.group.average(self.theta.detach() - self.flat(), get_codec(self.codec))
        self.theta.grad = result.average
        self.outer.step()
        self.theta.grad = None
        self.outer_step += 1
        self.copy_to_model()
        self.sync_buffers()
        h = blake3.blake3()  # as dilo.comm.protocol.state_digest
        h.update(self.theta.detach().numpy().tobytes())
        h.update(self.outer.state[self.theta]["momentum_buffer"].numpy().tobytes())
        h.update(self.outer_step.to_bytes(8, "little"))
        return h.hexdigest()


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("codec", ["int8", "fp4"])
def test_defaults_are_bit_identical_to_the_core_path(codec):
    """P = 1, τ = 0, overlap none: the same global hash after every outer step as the core code."""
    steps, workers = 14, 3  # ends mid-round: the final shorter round is compared too
    runs = {}
    for impl in ("core", "dilo"):
        groups = local_groups(workers)
        models = [bn_model() for _ in range(workers)]

        def worker(rank, impl=impl, groups=groups, models=models):
            model = models[rank]
            opt = adamw(model)
            if impl == "core":
                outer = CoreDiLoCo(model, opt, 4, groups[rank], codec)
            else:
                outer = DiLoCo(model, opt, inner_steps=4, codec=codec, group=groups[rank])
            hashes = []
            for step in range(steps):
                inner_step(model, opt, rank, step)
                stats = outer.step()
                if stats is not None:
                    hashes.append(stats if impl == "core" else stats.global_hash)
            hashes.append(outer.sync() if impl == "core" else outer.flush()[-1].global_hash)
            return hashes, [t.detach().clone() for t in model.state_dict().values()]

        runs[impl] = run_workers(worker, workers)
    for (core_hashes, core_state), (dilo_hashes, dilo_state) in zip(runs["core"], runs["dilo"]):
        assert len(core_hashes) == 4 and dilo_hashes == core_hashes
        assert all(torch.equal(a, b) for a, b in zip(core_state, dilo_state))


class SlowGroup(Group):
    """A group on a slow link: every average takes `seconds` longer; records the calling thread."""

    def __init__(self, inner: Group, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.rank, self.size = inner.rank, inner.size
        self.threads: set[int] = set()

    def average(self, flat, codec, owner_error=False):
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return self.inner.average(flat, codec)

    def broadcast(self, flat, src=0):
        self.inner.broadcast(flat, src)

    def all_gather_object(self, obj):
        return self.inner.all_gather_object(obj)


@pytest.mark.parametrize("overlap,delay", [("none", 0), ("none", 2), ("delayed", 0), ("eager", 0)])
def test_exchange_runs_while_the_worker_computes(overlap, delay):
    groups = local_groups(2)
    models = [Net() for _ in range(2)]

    def worker(rank):
        model, opt = models[rank], adamw(models[rank])
        group = SlowGroup(groups[rank], 0.1)
        diloco = DiLoCo(model, opt, inner_steps=6, codec="int8", group=group, delay=delay,
                        overlap=overlap)
        stats = []
        try:
            for step in range(18):
                inner_step(model, opt, rank, step)
                time.sleep(0.04)  # compute: 6 steps = 0.24 s, enough to hide a 0.1 s exchange
                stats.append(diloco.step())
            stats += diloco.flush()
        finally:
            diloco.close()
        return [s for s in stats if s is not None], group.threads, threading.get_ident()

    for stats, threads, me in run_workers(worker, 2):
        seconds = sum(s.seconds for s in stats)
        hidden = sum(s.seconds_hidden for s in stats)
        assert all(abs(s.seconds_hidden + s.seconds_exposed - s.seconds) < 1e-9 for s in stats)
        assert seconds >= 0.1 * len(stats)
        if overlap == "none" and delay == 0:
            assert hidden == 0 and threads == {me}
        else:
            assert me not in threads and len(threads) == 1  # one exchange thread, not the loop's
            # all in-loop exchanges overlap compute; only the final drain is exposed
            assert hidden > 0.4 * seconds, [(s.seconds, s.seconds_hidden) for s in stats]


def test_resume_with_exchanges_in_flight_is_exact():
    """eager + fragments + τ + fp4 + error feedback: a checkpoint taken while exchanges are in
    flight (and pending a round) resumes to the same hashes as a run that never stopped."""
    workers, steps, cut = 3, 22, 9
    options = dict(inner_steps=4, codec="fp4", fragments=2, delay=1, overlap="eager",
                   error_feedback=True, alpha=0.5)

    def run(stop_at: int | None):
        groups = local_groups(workers)
        models = [Net() for _ in range(workers)]
        fresh = [Net() for _ in range(workers)]

        def worker(rank):
            model, opt = models[rank], adamw(models[rank])
            diloco = DiLoCo(model, opt, group=groups[rank], **options)
            hashes, start = [], 0
            if stop_at is not None:
                for step in range(stop_at):
                    inner_step(model, opt, rank, step)
                    diloco.step()
                assert len(diloco.in_flight), "nothing in flight at the cut: the test would prove little"
                buf = io.BytesIO()
                torch.save(diloco.state_dict(), buf)
                diloco.close()
                model, start = fresh[rank], stop_at
                opt = adamw(model)
                diloco = DiLoCo(model, opt, group=groups[rank], **options)
                diloco.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            try:
                for step in range(start, steps):
                    inner_step(model, opt, rank, step)
                    stats = diloco.step()
                    if stats is not None:
                        hashes.append((step, stats.global_hash))
                hashes += [(steps, s.global_hash) for s in diloco.flush()]
            finally:
                diloco.close()
            return hashes

        return run_workers(worker, workers)

    whole, resumed = run(None), run(cut)
    for a, b in zip(whole, resumed):
        after_cut = [h for h in a if h[0] >= cut]
        assert len(after_cut) > 4 and b == after_cut


def test_fragments_of_the_gpt():
    model = GPT(ModelConfig(d_model=16, n_layers=4, n_heads=2, seq_len=8))
    params = list(model.parameters())
    owner = dict(zip([n for n, _ in model.named_parameters()], assign_fragments(model, params, 2)))
    assert owner["tok_emb.weight"] == owner["pos_emb.weight"] == 0  # head is tied to tok_emb
    assert owner["ln_f.weight"] == owner["ln_f.bias"] == 1
    for name, f in owner.items():
        if name.startswith("blocks."):
            assert f == int(name.split(".")[1]) % 2
    with pytest.raises(ValueError, match="at least 8 blocks"):
        assign_fragments(model, params, 8)


TINY = ["--config", str(REPO / "configs" / "tiny.toml")]


@pytest.mark.parametrize("args,keys", [
    (["--outer.fragments", "3"], ["outer.fragments", "outer.inner_steps"]),
    (["--outer.fragments", "4", "--outer.delay", "5"], ["outer.delay", "outer.inner_steps"]),
    (["--outer.delay", "-1"], ["outer.delay"]),
    (["--outer.alpha", "1.5"], ["outer.alpha"]),
    (["--outer.overlap", "async"], ["outer.overlap"]),
    (["--outer.fragments", "5", "--outer.inner_steps", "25"], ["outer.fragments", "model.n_layers"]),
    (["--comm.codec", "fp32", "--comm.error_feedback", "true"], ["comm.error_feedback", "comm.codec"]),
    (["--run.mode", "ddp", "--outer.overlap", "eager"], ["outer.overlap", "run.mode"]),
])
def test_impossible_settings_are_refused_naming_the_keys(args, keys):
    with pytest.raises(ValueError) as err:
        parse_args([*TINY, *args])
    assert all(key in str(err.value) for key in keys), str(err.value)


def test_the_documented_combination_is_accepted():
    cfg = parse_args([*TINY, "--outer.fragments", "4", "--outer.delay", "2", "--outer.overlap", "eager",
                      "--comm.codec", "fp4", "--comm.error_feedback", "true", "--outer.alpha", "0.5"])
    assert (cfg.outer.fragments, cfg.outer.delay, cfg.outer.overlap) == (4, 2, "eager")


@pytest.mark.parametrize("kwargs,word", [
    (dict(fragments=3), "fragments"), (dict(fragments=2, delay=2), "delay"),
    (dict(alpha=-0.1), "alpha"), (dict(overlap="async"), "overlap"),
    (dict(codec="fp32", error_feedback=True), "error_feedback"),
    (dict(outer_lr=0.0), "outer_lr"), (dict(outer_momentum=1.0), "outer_momentum"),
    (dict(outer_momentum=0.0), "nesterov"),
])
def test_constructor_refuses_bad_options(kwargs, word):
    model = Net()
    with pytest.raises(ValueError, match=word):
        DiLoCo(model, adamw(model), inner_steps=4, **kwargs)


def test_a_round_checkpointed_by_an_earlier_version_still_loads():
    """The keys a checkpoint's `rounds` entries were written with before the serialisation was
    derived from the dataclasses: they load (intra_bytes, saved since, defaults to 0), and the
    round saves under the same keys."""
    from dilo.in_flight import round_from_state, round_state

    old = {"fragment": 1, "started": 5, "sent": torch.ones(3), "pseudo_grad_norm": 2.0,
           "average": torch.zeros(3), "bytes_sent": 10, "bytes_received": 20, "num_peers": 2,
           "exchange_seconds": 0.5, "dropped": 1, "codec_error": 0.1, "buffers": None, "seconds": 0.6,
           "exposed": 0.2}
    rnd = round_from_state(old)
    result, buffers, seconds = rnd.handle.result()
    assert (rnd.fragment, rnd.started, rnd.pseudo_grad_norm) == (1, 5, 2.0)
    assert (result.bytes_sent, result.bytes_received, result.num_peers, result.seconds, result.dropped,
            result.codec_error, result.intra_bytes, result.adopted) == (10, 20, 2, 0.5, 1, 0.1, 0, None)
    assert (buffers, seconds, rnd.handle.exposed_seconds) == (None, 0.6, 0.2)
    assert (result.owner_error, result.reports) == (None, [])  # fields added since: their defaults
    assert set(round_state(rnd)) == set(old) | {"intra_bytes", "owner_error", "reports"}
