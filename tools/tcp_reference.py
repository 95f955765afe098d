"""A reference transport for bench_comm: plain TCP sockets between every pair of members.

It answers "what can this link carry?" in the same run as the backend under test: every
member sends the same number of bytes to each peer at once (one thread per connection,
both directions busy), with no protocol, phases or encoding. A backend's exchange time
divided by this one's, for the same bytes, is the backend's own cost; this one divided
by bytes/rate is the link's (TCP/IP headers, ACKs, tbf).

Member r listens on (addrs[r], base_port + r); it connects to every peer and accepts one
connection from every peer. Outgoing connections carry this member's data; incoming ones
the peers' data, so each TCP connection is used in one direction only.
"""

from __future__ import annotations

import socket
import threading
import time


class TcpMesh:
    def __init__(self, rank: int, addrs: list[str], base_port: int, timeout_s: float = 60.0):
        self.rank, self.addrs, self.base_port = rank, addrs, base_port
        self.timeout_s = timeout_s
        self.server = socket.create_server((addrs[rank], base_port + rank), backlog=len(addrs))
        self.outgoing: list[socket.socket] = []
        self.incoming: list[socket.socket] = []

    def connect(self) -> None:
        """Connect to every peer and accept every peer (call once all members listen)."""
        peers = [p for p in range(len(self.addrs)) if p != self.rank]
        accepted: list[socket.socket] = []
        acceptor = threading.Thread(target=lambda: accepted.extend(
            self.server.accept()[0] for _ in peers))
        acceptor.start()
        for p in peers:
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    self.outgoing.append(socket.create_connection(
                        (self.addrs[p], self.base_port + p), timeout=self.timeout_s))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        acceptor.join(self.timeout_s)
        if acceptor.is_alive() or len(accepted) != len(peers):
            raise TimeoutError(f"member {self.rank}: accepted {len(accepted)} of {len(peers)} peers")
        self.incoming = accepted

    def exchange(self, nbytes_per_peer: int) -> None:
        """Send nbytes_per_peer to every peer and receive as many from each, all at once."""
        payload = bytes(nbytes_per_peer)
        errors: list[BaseException] = []

        def send(conn: socket.socket) -> None:
            try:
                conn.sendall(payload)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def recv(conn: socket.socket) -> None:
            try:
                left = nbytes_per_peer
                while left:
                    chunk = conn.recv(min(left, 1 << 20))
                    if not chunk:
                        raise ConnectionError("peer closed the connection mid-transfer")
                    left -= len(chunk)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=send, args=(c,)) for c in self.outgoing]
        threads += [threading.Thread(target=recv, args=(c,)) for c in self.incoming]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout_s)
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError(f"member {self.rank}: raw TCP exchange failed: {errors or 'timeout'}")

    def close(self) -> None:
        for s in [*self.outgoing, *self.incoming, self.server]:
            s.close()
