"""A TCP proxy on loopback that a test can cut and restore: a network outage on demand.

Killing a server would take it away from every other test (and developer)
using it; the proxy takes away only the connections of the code under test.
``cut()`` closes every proxied connection and stops listening, so a client
sees its socket die and then "connection refused" on each reconnect attempt
until ``restore()`` listens on the same port again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

ACCEPT_POLL = 0.1  # s: how often the serving thread looks at cut/restore requests


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        with socket.socket() as s:  # a free port, kept across cut/restore
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._want_up = True
        self._closed = False
        self._is_up = threading.Event()
        self._is_down = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._is_up.wait(5):
            raise RuntimeError("the TCP proxy did not start listening within 5s")

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user and password kept)."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    def cut(self, timeout: float = 5.0) -> None:
        """Stop listening and close every open connection (both directions)."""
        self._is_up.clear()
        self._want_up = False
        if not self._is_down.wait(timeout):
            raise RuntimeError("the TCP proxy did not stop listening")
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self, timeout: float = 5.0) -> None:
        self._is_down.clear()
        self._want_up = True
        if not self._is_up.wait(timeout):
            raise RuntimeError("the TCP proxy could not listen again")

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._thread.join(5)

    # -- the serving thread ------------------------------------------------------

    def _listen(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL)
        return listener

    def _serve(self) -> None:
        listener: socket.socket | None = None
        while not (self._closed and listener is None):
            if listener is not None and (not self._want_up or self._closed):
                listener.close()
                listener = None
                self._is_down.set()
                continue
            if listener is None:
                if self._want_up and not self._closed:
                    listener = self._listen()
                    self._is_up.set()
                else:
                    self._is_down.set()
                    threading.Event().wait(ACCEPT_POLL)
                continue
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._socks.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()
        self._is_down.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                gone = [s for s in (src, dst) if s in self._socks]
                self._socks.difference_update(gone)
            for s in gone:
                s.close()


@contextlib.contextmanager
def tcp_proxy(url: str, default_port: int) -> Iterator[TcpProxy]:
    """A proxy in front of the server of ``url``, closed at the end."""
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)
    try:
        yield proxy
    finally:
        proxy.close()
