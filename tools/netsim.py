"""A WAN simulator: Linux network namespaces joined by veth, links limited with `tc tbf`.

    # one namespace; every process in it shares one rate-limited loopback
    python tools/netsim.py --rate 100mbit -- torchrun --nproc-per-node 4 -m dilo.train ...

    # one namespace per host, each with its own 100 Mbit/s link to a hub (a bridge);
    # {rank}, {hosts}, {addr}, {addr0} are replaced per host
    python tools/netsim.py --rate 100mbit --hosts 4 -- torchrun --nnodes 4 --node-rank {rank} \\
        --nproc-per-node 1 --master-addr {addr0} --master-port 29500 -m dilo.train ...

Topology. `--hosts 1`: one namespace; with a rate, its `lo` gets MTU 1500 and a tbf
qdisc, so all processes inside share one link of that rate (every byte sent between
them passes it once). `--hosts N` (N >= 2): a hub namespace holds a bridge; host i is a
namespace whose `eth0` (10.77.0.<i+1>/24) is one end of a veth pair, the other end a
port of the bridge. Both ends get a tbf qdisc, so each host's egress AND ingress are
limited to the rate: a full-duplex access link, the hub itself is never the bottleneck.
Every host reaches every other one (torchrun's rendezvous on {addr0} included).
Commands get GLOO_SOCKET_IFNAME set to their host's interface (lo or eth0) unless it is
already set, so torch.distributed's gloo backend binds to the simulated link.

What is not simulated: latency and loss. This kernel has no `netem`, so there is no
delay besides the queueing that tbf itself adds (its queue holds `latency` worth of
data, 20 ms by default). Results are therefore for high-bandwidth-delay-product links
at RTT ~ 0: a lower bound on the time a real WAN exchange of the same bytes takes.

Clean-up. Namespace names are unique per invocation (`dilo-<pid>-<random>-...`), so
parallel runs never collide. Everything is removed on exit, on an exception, on
Ctrl-C, SIGTERM or SIGHUP (try/finally + signal handlers): every process still inside
a namespace is killed first (a namespace outlives `ip netns del` while a process holds
it). Only a SIGKILL of this process can leave namespaces behind; `--gc` removes those
whose creating process is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.report import ToolError  # noqa: E402

PREFIX = "dilo"
SUBNET = "10.77.0"
MAX_HOSTS = 250
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_NO_LIMIT = ("none", "unlimited", "loopback", "inf")


class NetSimError(ToolError):
    """The simulator could not do what was asked (privileges, tools, bad input)."""


def parse_rate(text: str) -> int | None:
    """'100mbit' -> 100_000_000 bits/s; 'none' (or unlimited/loopback) -> None (no limit).

    Units are tc's bit units (SI, powers of 1000): bit, kbit, mbit, gbit, tbit, optionally
    followed by '/s'. Byte units are refused: tc's 'mbps' means megaBYTES per second and is a
    classic source of 8x mistakes.
    """
    s = str(text).strip().lower().replace(" ", "")
    if s in _NO_LIMIT:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)(?:/s)?", s)
    if not m:
        hint = " (tc's 'bps' units are bytes per second; write bits, e.g. 100mbit)" if "bps" in s else ""
        raise ValueError(f"rate {text!r} is not understood{hint}; write e.g. 20mbit, 100mbit, 1gbit "
                         f"or {'/'.join(_NO_LIMIT[:2])} for no limit")
    bps = round(float(m.group(1)) * _UNITS[m.group(2)])
    if bps < 8000:
        raise ValueError(f"rate {text!r} is below 8kbit; tbf cannot shape that slowly")
    return bps


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "unlimited"
    for scale, unit in ((10**9, "Gbit/s"), (10**6, "Mbit/s"), (10**3, "kbit/s")):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps} bit/s"


def tbf_args(bps: int, latency_ms: float = 20.0) -> list[str]:
    """tc arguments of the token bucket for one link direction.

    burst: 2 ms of data but at least 16 kB (a few MTU-sized frames; tbf splits GSO
    super-packets to fit). The kernel's timers are high-resolution, so bursts far below
    the old rate/HZ rule of thumb shape exactly.
    """
    burst = max(16_000, bps // 8 // 500)
    return ["tbf", "rate", f"{bps}bit", "burst", str(burst), "latency", f"{latency_ms:g}ms"]


def require_tools() -> None:
    """Fail with a clear message when ip/tc or the privileges are missing."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetSimError(f"netsim needs {' and '.join(missing)} (package iproute2) on PATH")
    if os.geteuid() != 0:
        raise NetSimError("netsim needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network "
                          "namespaces, veth pairs and tc qdiscs; run it as root (e.g. with sudo)")


def unavailable() -> str | None:
    """Why netsim cannot run on this machine, or None when it can: ip/tc missing, not root,
    or the kernel refusing network namespaces (a container without CAP_SYS_ADMIN). Creates
    and removes one probe namespace. The tests skip with this reason."""
    try:
        require_tools()
    except NetSimError as e:
        return str(e)
    probe = f"{PREFIX}-probe-{os.getpid()}-{secrets.token_hex(3)}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"netsim cannot create a network namespace here: {res.stderr.strip() or res.stdout.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cmd(["ip", *args], check)


def _cmd(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise NetSimError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _ns_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to `ip netns` (anyone's)."""
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


class NetSim:
    """Namespaces and rate-limited links for one experiment; a context manager.

    with NetSim(hosts=4, rate="100mbit") as net:
        p = net.popen(0, ["python", "-c", "..."])      # runs inside host 0
        net.address(0), net.counters(0)["tx_bytes"]
    """

    def __init__(self, hosts: int = 1, rate: str | int | None = None, latency_ms: float = 20.0):
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be in 1..{MAX_HOSTS}, got {hosts}")
        self.hosts = hosts
        self.rate_bps = rate if isinstance(rate, int) or rate is None else parse_rate(rate)
        self.latency_ms = latency_ms
        self.name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []  # created so far, hub last
        self.procs: list[subprocess.Popen] = []
        self._old_handlers: dict[int, object] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- layout ------------------------------------------------------------------------
    def namespace(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def address(self, host: int) -> str:
        return "127.0.0.1" if self.hosts == 1 else f"{SUBNET}.{host + 1}"

    def interface(self, host: int) -> str:
        return "lo" if self.hosts == 1 else "eth0"

    def describe(self) -> str:
        if self.hosts == 1:
            return f"1 namespace, shared loopback at {format_rate(self.rate_bps)}"
        return (f"{self.hosts} hosts on a hub, each link {format_rate(self.rate_bps)} per direction "
                f"(addresses {self.address(0)}..{self.address(self.hosts - 1)})")

    # -- life cycle --------------------------------------------------------------------
    def __enter__(self) -> NetSim:
        self._install_signal_handlers()
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        require_tools()
        for host in range(self.hosts):
            self._add_namespace(self.namespace(host))
        if self.hosts == 1:
            ns = self.namespace(0)
            if self.rate_bps is not None:
                _ip("-n", ns, "link", "set", "lo", "mtu", "1500")
                self._shape(ns, "lo")
            return
        hub = f"{self.name}-hub"
        self._add_namespace(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for host in range(self.hosts):
            ns, port = self.namespace(host), f"h{host}"
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", port, "master", "br0")
            _ip("-n", hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.rate_bps is not None:
                self._shape(ns, "eth0")  # host egress
                self._shape(hub, port)   # host ingress (the hub's egress towards it)

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str) -> None:
        _cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(self.rate_bps, self.latency_ms)])

    def close(self, grace_s: float = 10.0) -> None:
        """End every process started here or still inside a namespace; delete the namespaces."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            for p in self.procs:
                if p.poll() is None:
                    _signal_group(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            errors = []
            for ns in self.namespaces:
                for _ in range(3):  # children may fork while we kill; a few rounds settle it
                    pids = _ns_pids(ns)
                    if not pids:
                        break
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    time.sleep(0.1)
                res = _ip("netns", "del", ns, check=False)
                if res.returncode != 0:
                    errors.append(f"{ns}: {res.stderr.strip()}")
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
            if errors:
                raise NetSimError("could not remove namespaces: " + "; ".join(errors))
        finally:
            self._restore_signal_handlers()

    # Converting SIGTERM/SIGHUP into SystemExit lets the `finally` of `with` run; SIGINT
    # already raises KeyboardInterrupt. Only the main thread may install handlers.
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def leave(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, leave)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- use ---------------------------------------------------------------------------
    def popen(self, host: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` inside host's namespace, in a new session (its own process group)."""
        if self._closed or not self.namespaces:
            raise NetSimError("NetSim is not running; use it as a context manager")
        # gloo picks its interface from the hostname, which in a namespace resolves to an
        # address that is not there; point it at the host's link unless the caller chose.
        env = dict(kwargs.pop("env", None) or os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", self.interface(host))
        p = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *cmd],
                             start_new_session=True, env=env, **kwargs)
        self.procs.append(p)
        return p

    def counters(self, host: int) -> dict[str, int]:
        """Bytes and packets through host's interface so far (for `lo`: each byte once)."""
        ns, dev = self.namespace(host), self.interface(host)
        stats = json.loads(_ip("-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"],
                "tx_dropped": stats["tx"]["dropped"]}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def collect_garbage() -> list[str]:
    """Delete `dilo-<pid>-*` namespaces whose creating process no longer exists."""
    require_tools()
    removed = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]{{6}}-(h\d+|hub)", ns)
        if m and not _pid_alive(int(m.group(1))):
            for pid in _ns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def expand(cmd: list[str], net: NetSim, host: int) -> list[str]:
    """Replace {rank}, {hosts}, {addr}, {addr0} in each argument (plain text replacement)."""
    values = {"{rank}": str(host), "{hosts}": str(net.hosts), "{addr}": net.address(host),
              "{addr0}": net.address(0)}
    out = []
    for arg in cmd:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def run_command(cmd: list[str], hosts: int, rate: str, latency_ms: float = 20.0) -> int:
    """Run cmd once per host inside the simulated network; the first failure ends the others."""
    with NetSim(hosts=hosts, rate=rate, latency_ms=latency_ms) as net:
        print(f"netsim: {net.describe()}", file=sys.stderr, flush=True)
        procs = [net.popen(h, expand(cmd, net, h)) for h in range(hosts)]
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="netsim", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="usage: netsim.py --rate 100mbit [--hosts N] -- CMD ARGS...  (see the module docstring)")
    parser.add_argument("--rate", help="link rate: 20mbit, 100mbit, 1gbit, ... or none")
    parser.add_argument("--hosts", type=int, default=1, help="namespaces (default 1: shared loopback)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="tbf queue size in ms of data (not a delay: netem is unavailable)")
    parser.add_argument("--gc", action="store_true",
                        help="remove namespaces left by netsim processes that were SIGKILLed, then exit")
    args = parser.parse_args(argv)
    try:
        if args.gc:
            removed = collect_garbage()
            print(f"netsim: removed {len(removed)} stale namespaces {' '.join(removed)}".rstrip())
            return 0
        if args.rate is None or not cmd:
            parser.error("give --rate and a command after --")
        parse_rate(args.rate)
        if not 1 <= args.hosts <= MAX_HOSTS:
            parser.error(f"--hosts must be in 1..{MAX_HOSTS}")
        return run_command(cmd, args.hosts, args.rate, args.latency_ms)
    except (NetSimError, ValueError) as e:
        print(f"netsim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
