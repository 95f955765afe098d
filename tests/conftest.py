"""Fixtures only (what tests share otherwise lives in tests/helpers.py).

Two guards keep the suite honest:
* a test that starts dilo, torchrun or a run-launching tool in a child process must carry
  the `e2e` marker (so `pytest -m "not slow and not e2e"` is a quick loop of in-process
  tests); one that does so unmarked fails;
* a test must leave the SIGINT/SIGTERM handlers as it found them (a handler left behind
  changes what Ctrl-C does to the rest of the run); one that does not fails, and the
  handlers are restored.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Procs
from tools import netsim

# Run in the background, the suite starts with SIGINT ignored, and its children would inherit
# that (only caught signals are reset by exec): tests that press Ctrl-C on a run need it caught.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A child command starts a multi-process run when one of its words is one of these modules
# (python -m ...), a torchrun executable, or one of these tools' scripts; `dilo.cli` counts
# unless it is given no command or only asked for help or its version.
_E2E_MODULES = ("torch.distributed.run", "dilo.torchrun", "dilo.train", "tests.islands_worker")
_ONLY_ASKS = {"-h", "--help", "--version"}
_E2E_TOOLS = ("chaos", "bench_", "netsim")
# Fixtures that start such runs (a module-scoped one does so before the Popen check is set up).
_E2E_FIXTURES = ("procs", "swarm", "island_results")
_GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _starts_a_run(args) -> bool:
    words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    for word in words:
        path = Path(word)
        if word in _E2E_MODULES or path.name == "torchrun":
            return True
        if word == "dilo.cli":  # a bare `dilo` prints its usage; help and version start nothing
            rest = set(words[words.index(word) + 1:])
            return bool(rest) and not _ONLY_ASKS & rest
        if word.startswith("tools.") and word[len("tools."):].startswith(_E2E_TOOLS):
            return True
        if path.parent.name == "tools" and path.suffix == ".py" and path.name.startswith(_E2E_TOOLS):
            return True
    return False


@pytest.fixture(autouse=True)
def _e2e_marker_is_honest(request, monkeypatch):
    started: list[str] = []
    popen_init = subprocess.Popen.__init__

    def recording_init(self, args, *rest, **kwargs):
        if _starts_a_run(args):
            started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    yield
    if request.node.get_closest_marker("e2e") is not None:
        return
    used = [f for f in _E2E_FIXTURES if f in request.fixturenames]
    if started or used:
        what = started[0][:200] if started else f"uses the fixture {used[0]!r}"
        pytest.fail(f"{request.node.nodeid} starts a multi-process run but has no @pytest.mark.e2e: "
                    f"{what}", pytrace=False)


@pytest.fixture(autouse=True)
def _signal_handlers_are_restored(request):
    before = {sig: signal.getsignal(sig) for sig in _GUARDED_SIGNALS}
    yield
    changed = [signal.Signals(sig).name for sig, handler in before.items() if signal.getsignal(sig) != handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    if changed:
        pytest.fail(f"{request.node.nodeid} left the {' and '.join(changed)} handler changed "
                    "(restore it in the test)", pytrace=False)


@pytest.fixture
def keep_signal_handlers():
    """For a test that calls code which sets signal handlers for a whole process (e.g. the
    reaper's loop): puts SIGINT/SIGTERM back afterwards."""
    before = {sig: signal.getsignal(sig) for sig in _GUARDED_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture
def no_launch_env(monkeypatch):
    """No torchrun variables in this process's environment while the test runs (a test that
    trains in-process must not believe it is one rank of a torchrun; restored afterwards)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def procs():
    """Processes started through it are killed (with their whole tree) at teardown."""
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def needs_netsim():
    """Skips, with the reason, where network namespaces or tc cannot be used here."""
    reason = netsim.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def backend():
    """`use_backend` of the codec kernels ("numba" or "torch"), the previous one restored after
    (tests/test_codec_kernels.py parametrizes its own fixture of this name)."""
    from dilo import codec_kernels
    previous = codec_kernels.BACKEND
    yield codec_kernels.use_backend
    codec_kernels.use_backend(previous)
