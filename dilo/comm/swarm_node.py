"""One peer's presence in the swarm: an event-loop thread, the libp2p daemon, a DHT node, RPCs.

Everything here runs on one asyncio loop in a daemon thread of the training process;
the training thread hands it coroutines through `run()`. There is no separate DHT or
averager process (hivemind's DHT and DecentralizedAverager are forked processes that
outlive a killed parent): the only child is hivemind's `p2pd`, which the reaper
(reaper.py) kills if this process dies without cleaning up.

RPCs are length-prefixed frames on libp2p streams: a request is a msgpack header frame,
then as many raw payload frames as the header says; the answer has the same shape. Every
header carries the sender's run-key token (swarm_auth.py), checked against the peer id
that libp2p authenticated before any payload is read. Large payloads (contributions,
global states) go as raw bytes in 1 MiB writes with flow control, never through protobuf
and never buffered whole in the transport.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Awaitable, Callable

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # third-party noise off unless asked for

import msgpack  # noqa: E402  (hivemind dependency)
from hivemind.dht.node import DHTNode  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

from dilo.comm.reaper import Reaper  # noqa: E402
from dilo.comm.swarm_auth import AuthError, RunAuth  # noqa: E402

log = logging.getLogger("dilo")

PROTOCOL = "dilo/swarm/1"
HEADER_LIMIT = 1 << 20  # a header frame above this is garbage (read before authentication)
FRAME_LIMIT = 1 << 40
_CHUNK = 1 << 20
Frames = list  # of bytes-like objects
Handler = Callable[[PeerID, dict, Frames], Awaitable[tuple[dict, Frames]]]


class PeerUnreachable(Exception):
    """A call that did not get an answer: the peer is dead, gone or cut off."""


class RemoteError(Exception):
    """The peer answered with an error."""


async def _send_frame(writer: asyncio.StreamWriter, data) -> None:
    view = memoryview(data).cast("B")
    writer.write(len(view).to_bytes(8, "big"))
    for offset in range(0, len(view), _CHUNK):
        writer.write(view[offset:offset + _CHUNK])
        await writer.drain()
    await writer.drain()


async def _recv_frame(reader: asyncio.StreamReader, limit: int = FRAME_LIMIT) -> bytearray:
    size = int.from_bytes(await reader.readexactly(8), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes is over the limit of {limit}")
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        chunk = await reader.read(min(size - got, _CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(view[:got]), size)
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return buf


def _frames(payload) -> Frames:
    if payload is None:
        return []
    return list(payload) if isinstance(payload, (list, tuple)) else [payload]


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes) -> dict:
    obj = msgpack.unpackb(raw, raw=False)
    if not isinstance(obj, dict):
        raise ValueError("malformed frame")
    return obj


class SwarmNode:
    """Start with `SwarmNode.start(...)`; every method but `run`/`close` runs on the loop."""

    def __init__(self, auth: RunAuth, namespace: str):
        self.auth = auth
        self.namespace = namespace
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dilo-swarm", daemon=True)
        self.reaper: Reaper | None = None
        self.p2p: P2P | None = None
        self.dht: DHTNode | None = None
        self.peer_id: PeerID | None = None
        self._sockets = ""
        self.on_refused: Callable[[str, str], None] = lambda peer, why: None

    # -- lifecycle (training thread) -----------------------------------------------------
    @classmethod
    def start(cls, auth: RunAuth, *, initial: list[str], listen: list[str], announce: list[str],
              identity_file: str, timeout: float) -> SwarmNode:
        node = cls(auth, auth.namespace)
        node.reaper = Reaper.start()
        node._thread.start()
        # p2pd inherits an ignored SIGINT (Go keeps it ignored): a terminal's Ctrl-C, sent to
        # the whole process group, then stops only this process, which leaves cleanly.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            node.run(node._start(initial, listen, announce, identity_file), timeout)
        except BaseException:
            node.close()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return node

    def run(self, coro: Awaitable, timeout: float | None = None):
        """Run `coro` on the loop and wait for its result (from the training thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def _start(self, initial, listen, announce, identity_file) -> None:
        if identity_file:
            Path(identity_file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # The daemon's two unix sockets get a prefix of our own, known before it starts: a
        # daemon that fails to start (or a peer killed while it starts) leaves no files.
        self._sockets = f"/tmp/dilo-{os.getpid()}-{secrets.token_hex(4)}-"
        self.reaper.watch_glob(self._sockets + "*")
        p2p_class = type("DiloP2P", (P2P,), {"_UNIX_SOCKET_PREFIX": "/unix" + self._sockets})
        try:
            self.p2p = await p2p_class.create(
                initial_peers=initial or None, host_maddrs=listen, announce_maddrs=announce or None,
                identity_path=str(Path(identity_file).expanduser()) if identity_file else None)
        except Exception as e:
            raise ValueError(f"cannot start the libp2p daemon (peers.listen={listen}, "
                             f"peers.announce={announce}): {e}") from None
        # The daemon is our child; if this process dies, the reaper ends it and its sockets.
        child = getattr(self.p2p, "_child", None)
        if child is not None:
            self.reaper.watch_pid(child.pid)
        self.peer_id = self.p2p.peer_id
        try:
            self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=initial or None,
                                            record_validator=self.auth.validator(), wait_timeout=3)
        except Exception as e:
            raise ValueError(f"could not join the swarm through peers.initial={initial}: {e}") from None

    def close(self) -> None:
        """Stop the DHT node and the daemon, remove the sockets, stop the thread. Idempotent."""
        if self._thread.is_alive():
            try:
                self.run(self._stop(), timeout=15)
            except Exception as e:  # a half-started node: the reaper cleans what is left
                log.debug("swarm shutdown: %r", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if self.reaper is not None:
            for path in glob.glob(self._sockets + "*") if self._sockets else ():
                try:  # hivemind leaves the daemon's socket when the daemon failed
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            clean = self.p2p is None or getattr(self.p2p, "_child", None) is None \
                or self.p2p._child.returncode is not None
            self.reaper.close(clean=clean)
            self.reaper = None

    async def _stop(self) -> None:
        if self.dht is not None:
            await self.dht.shutdown()
            self.dht = None
        if self.p2p is not None:
            await self.p2p.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- addresses -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.peer_id.to_base58()

    async def addresses(self) -> list[str]:
        return [str(m) for m in await self.p2p.get_visible_maddrs(latest=True)]

    # -- RPC -----------------------------------------------------------------------------
    @staticmethod
    def _handle_name(method: str) -> str:
        # Not derived from the run key: a peer with a wrong key must reach the handler to
        # be told so (the token check inside answers "refused"), not get "no such protocol".
        return f"{PROTOCOL}.{method}"

    async def serve(self, method: str, handler: Handler) -> None:
        """Answer `method` calls with `handler(remote, header, frames) -> (header, frames)`."""

        async def on_stream(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = info.peer_id
            try:
                request = _unpack(await _recv_frame(reader, HEADER_LIMIT))
                if not self.auth.check(remote.to_bytes(), request.get("tok", b"")):
                    self.on_refused(remote.to_base58(), "run key")
                    reply, out = {"err": "refused: this peer does not hold the swarm's run key "
                                          "(peers.key_file / DILO_RUN_KEY)", "auth": True}, []
                else:
                    frames = [await _recv_frame(reader) for _ in range(int(request.get("n", 0)))]
                    try:
                        reply, out = await handler(remote, request.get("h", {}), frames)
                        out = _frames(out)
                    except AuthError as e:
                        reply, out = {"err": str(e), "auth": True}, []
                    except Exception as e:  # answered, so the caller does not wait for a timeout
                        log.debug("swarm handler %s failed: %r", method, e, exc_info=True)
                        reply, out = {"err": f"{type(e).__name__}: {e}"}, []
                await _send_frame(writer, _pack({"h": reply, "tok": self.auth.token(self.peer_id.to_bytes()),
                                                 "n": len(out)}))
                for frame in out:
                    await _send_frame(writer, frame)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                pass  # the caller went away or sent garbage; nothing to answer
            finally:
                writer.close()

        await self.p2p.add_binary_stream_handler(self._handle_name(method), on_stream)

    async def call(self, peer: PeerID | str, method: str, header: dict, payload=None,
                   timeout: float = 10.0) -> tuple[dict, Frames]:
        """One request (payload: a buffer or a list of them) and its answer (header, frames);
        raises PeerUnreachable, AuthError or RemoteError."""
        peer = PeerID.from_base58(peer) if isinstance(peer, str) else peer
        try:
            return await asyncio.wait_for(self._call(peer, method, header, payload), timeout)
        except (AuthError, RemoteError):
            raise
        except asyncio.TimeoutError:
            raise PeerUnreachable(f"{peer.to_base58()} did not answer {method} within {timeout:.0f} s") from None
        except Exception as e:
            raise PeerUnreachable(f"{peer.to_base58()} unreachable for {method}: {type(e).__name__}: {e}") from None

    async def _call(self, peer: PeerID, method: str, header: dict, payload) -> tuple[dict, Frames]:
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, self._handle_name(method))
        try:
            frames = _frames(payload)
            request = {"h": header, "tok": self.auth.token(self.peer_id.to_bytes()), "n": len(frames)}
            await _send_frame(writer, _pack(request))
            for frame in frames:
                await _send_frame(writer, frame)
            answer = _unpack(await _recv_frame(reader, HEADER_LIMIT))
            out = [await _recv_frame(reader) for _ in range(int(answer.get("n", 0)))]
        finally:
            writer.close()
        reply = answer.get("h", {})
        if reply.get("auth"):
            raise AuthError(reply["err"])
        if not self.auth.check(peer.to_bytes(), answer.get("tok", b"")):
            self.on_refused(peer.to_base58(), "run key")
            raise AuthError(f"peer {peer.to_base58()} does not hold this swarm's run key")
        if "err" in reply:
            raise RemoteError(reply["err"])
        return reply, out

    # -- DHT -----------------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    async def store(self, name: str, subkey: str, value: dict, ttl: float) -> bool:
        return await self.dht.store(self.key(name), value, get_dht_time() + ttl, subkey=subkey)

    async def get_all(self, name: str) -> dict[str, dict]:
        """Every live subkey's value under `name` (signed records only)."""
        found = await self.dht.get(self.key(name), latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for subkey, item in found.value.items():
            if isinstance(subkey, bytes):
                subkey = subkey.decode(errors="replace")
            if isinstance(item.value, dict):
                out[subkey] = item.value
        return out
