"""A loopback TCP proxy the reliability tests control: forward, drop every connection, refuse.

It stands between the scoring service and PostgreSQL (or anything else that speaks TCP):

* ``cut()`` resets every open connection (``SO_LINGER`` 0, so the client sees a reset, as after a
  server crash or a firewall drop) and closes the listening socket, so new connections are
  *refused* (``ECONNREFUSED``), as when the database host is down;
* ``restore()`` listens again on the same port; the client reconnects by itself or not at all;
* ``lose_next_commit_reply(marker)``: the next PostgreSQL ``COMMIT`` of a transaction that sent
  ``marker`` reaches the server, which commits, but its reply never comes back: the connection is
  reset instead. The client cannot tell whether its transaction committed (the ambiguous commit).

Plain threads and blocking sockets: two threads per proxied connection, which is plenty for a
service's small connection pool.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cuts: list[tuple[float, float | None]] = field(default_factory=list)  # (cut, restored) times
    commit_replies_lost: int = 0


class TcpProxy:
    """``with TcpProxy(("127.0.0.1", 5432)) as proxy: proxy.port`` ... ``proxy.cut()``."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._lose_commit_after: bytes | None = None
        self._saw_marker: set[socket.socket] = set()
        self._muted: set[socket.socket] = set()  # upstream sockets whose replies are dropped

    # -- control ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until ``restore()``."""
        self._stop_listening()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            _reset(s)
        with self._lock:
            self.stats.reset += len(conns) // 2
            self.stats.cuts.append((time.monotonic(), None))

    def restore(self) -> None:
        self._listen()
        with self._lock:
            if self.stats.cuts and self.stats.cuts[-1][1] is None:
                self.stats.cuts[-1] = (self.stats.cuts[-1][0], time.monotonic())

    def lose_next_commit_reply(self, marker: bytes) -> None:
        with self._lock:
            self._lose_commit_after = marker

    def close(self) -> None:
        self._closed.set()
        self._stop_listening()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            _reset(s)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _listen(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept, args=(listener,), name="proxy-accept", daemon=True
        )
        self._accept_thread.start()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by cut()/close()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
                self.stats.accepted += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, up), name="proxy-pipe", daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not up and src in self._muted:
                    return  # the reply to a lost commit: never delivered
                if up and self._lose_commit_after is not None and self._commit_lost(src, data):
                    with self._lock:
                        self._muted.add(dst)
                    dst.sendall(data)  # the server gets the COMMIT...
                    time.sleep(0.3)  # ...and commits; the reply is never passed back
                    with self._lock:
                        self._conns.discard(src)
                        self._conns.discard(dst)
                    _reset(src)
                    _reset(dst)
                    return
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                owned = src in self._conns
                self._conns.discard(src)
                self._conns.discard(dst)
            if owned:  # an orderly close by one side: pass it on
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()

    def _commit_lost(self, src: socket.socket, data: bytes) -> bool:
        """Does ``data`` carry the COMMIT of a transaction that sent the armed marker?"""
        with self._lock:
            marker = self._lose_commit_after
            if marker is None:
                return False
            if marker in data:
                self._saw_marker.add(src)
            # "COMMIT" as a whole statement (simple or extended protocol), not "ON COMMIT ...".
            if src in self._saw_marker and _COMMIT.search(data):
                self._saw_marker.discard(src)
                self._lose_commit_after = None
                self.stats.commit_replies_lost += 1
                return True
            return False


_COMMIT = re.compile(rb"[\x00-\x1f]COMMIT\x00")


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset (linger 0): the peer gets ECONNRESET, not an orderly EOF."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # SHUT_RD wakes a thread blocked in recv() on this socket (close() alone would not, and the
    # reset would wait for it) without sending a FIN.
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        s.close()
