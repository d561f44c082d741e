"""A loopback fault proxy in front of the tests' S3 server (moto): outages on demand.

    proxy = FaultProxy("http://127.0.0.1:PORT").start()     # listens on 127.0.0.1, a free port
    proxy.endpoint                                            # point data.endpoint_url here
    proxy.outage("refuse", 6)                                 # refused connections for 6 s, from now
    proxy.arm("503", 6, method="GET", path=r"/shard-")        # 503s for 6 s from the first matching request
    proxy.recovered()                                         # seconds from the end of the outage to the next request
    proxy.stop()

Modes: ``pass`` forwards bytes both ways; ``refuse`` stops listening (a connect gets ECONNREFUSED)
and resets every open connection; ``503`` answers every request with ``503 Service Unavailable``
and an S3-style XML error body, then closes the connection. Switching away from ``pass`` resets
the open connections, so a transfer in flight fails too. ``arm`` starts an outage at the first
request whose line matches, before that request reaches the server (the request fails), so a
test can strike in the middle of shard reads or of a checkpoint upload (``after=n``: at the
n+1-th matching request). ``windows`` records every outage as ``(mode, started, ended, request
line that triggered it)`` and ``requests`` every request forwarded, as ``(time, request line)``
(``time.time()``; the last ``MAX_REQUESTS``).

Threads only, every loop bounded by a short ``select`` timeout and a stop flag; nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import collections
import re
import selectors
import socket
import struct
import threading
import time
from urllib.parse import urlparse

MODES = ("pass", "refuse", "503")
MAX_REQUESTS = 100_000
_TICK = 0.05  # seconds: how often loops look at the mode and the stop flag
_REQUEST = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")
_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
         b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), as a dead server or a cut network does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.port = 0
        self.mode = "pass"
        self.windows: list[tuple[str, float, float | None, str | None]] = []
        self.answered_503 = 0
        self.requests: collections.deque[tuple[float, str]] = collections.deque(maxlen=MAX_REQUESTS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._armed: list[list] = []  # [mode, seconds, method, path, matches to let pass, head, hold] each
        self._timer: threading.Timer | None = None
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = self._listen()
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, name="fault-proxy-accept")
        return self

    def set_mode(self, mode: str, trigger: str | None = None) -> None:
        """Switch now; leaving ``pass`` resets every open connection. Outages are recorded."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        with self._lock:
            if mode == self.mode:
                return
            now = time.time()
            if self.mode != "pass" and self.windows and self.windows[-1][2] is None:
                m, t0, _, why = self.windows[-1]
                self.windows[-1] = (m, t0, now, why)
            if mode != "pass":
                self.windows.append((mode, now, None, trigger))
            if mode == "refuse" and self._listener is not None:  # connects are refused from now on
                self._listener.close()
                self._listener = None
            elif mode != "refuse" and self._listener is None:  # listening again before this returns
                self._listener = self._listen()
            self.mode = mode
            doomed = list(self._conns) if mode != "pass" else []
            self._conns.difference_update(doomed)
        for sock in doomed:
            _reset(sock)

    def outage(self, mode: str, seconds: float, trigger: str | None = None) -> None:
        """``mode`` from now for ``seconds``, then ``pass`` again."""
        if self._timer is not None:
            self._timer.cancel()
        self.set_mode(mode, trigger)
        timer = threading.Timer(seconds, self.set_mode, args=("pass",))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def arm(self, mode: str, seconds: float, method: str | None = None, path: str = "", after: int = 0,
            head: str = "", hold: float = 0.0) -> None:
        """An ``outage(mode, seconds)`` that starts at the first request of ``method`` (any when
        None) whose path (with its query) matches the regex ``path`` and whose head (request line
        and headers, e.g. ``Range: bytes=1024-``) matches ``head``, once ``after`` such requests
        have passed; that request never reaches the server. ``hold``: seconds that request is held
        before the outage starts (other connections go on meanwhile). Several may be armed at once."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        with self._lock:
            self._armed.append([mode, seconds, method, re.compile(path.encode()), after,
                                re.compile(head.encode()), hold])

    def clear(self) -> None:
        """Disarm every trigger and end any outage now."""
        with self._lock:
            self._armed = []
        if self._timer is not None:
            self._timer.cancel()
        self.set_mode("pass")

    def recovered(self, window: int = -1) -> float | None:
        """Seconds from the end of outage ``window`` to the first request forwarded after it (the
        client's retry reaching the server again); None if it has not ended or none came."""
        ended = self.windows[window][2] if self.windows else None
        if ended is None:
            return None
        return next((t - ended for t, _ in list(self.requests) if t >= ended), None)

    @property
    def armed(self) -> int:
        """Triggers armed and not yet struck."""
        return len(self._armed)

    def wait_until_pass(self, timeout: float) -> bool:
        """Wait (bounded) until no outage is on and none is armed; whether that happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mode == "pass" and not self._armed:
                return True
            time.sleep(_TICK)
        return False

    def stop(self) -> None:
        """Stop every thread and close every socket (bounded joins)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            conns, self._conns = list(self._conns), set()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        for sock in conns:
            _reset(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _listen(self) -> socket.socket:
        """A listening socket on 127.0.0.1 (``self.port``, 0 the first time); a few bounded tries."""
        for attempt in range(40):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
            except OSError:
                sock.close()
                if attempt == 39:
                    raise
                time.sleep(_TICK)
                continue
            sock.listen(64)
            sock.setblocking(False)
            return sock
        raise AssertionError("unreachable")

    def _accept_loop(self) -> None:
        """Accept while a listening socket is open (``set_mode`` closes it for ``refuse``, so a
        connect is refused by the kernel, and opens it again on the same port afterwards)."""
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(_TICK)
                continue
            try:
                with selectors.DefaultSelector() as sel:
                    sel.register(listener, selectors.EVENT_READ)
                    if not sel.select(timeout=_TICK):
                        continue
                client, _ = listener.accept()
            except (OSError, ValueError):  # closed meanwhile (refuse, stop), or nothing to accept
                continue
            client.setblocking(True)
            handler = self._answer_503 if self.mode == "503" else self._pipe
            self._spawn(handler, client, name="fault-proxy-conn")

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if self.mode != "pass" or self._stop.is_set():
                return False
            self._conns.update(socks)
            return True

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            live = [s for s in socks if s in self._conns]
            self._conns.difference_update(live)
        for sock in live:
            sock.close()

    def _strike(self, data: bytes) -> bool:
        """Whether ``data`` (from a client) holds the request line of an armed outage; starts it.
        Otherwise the request lines in ``data`` are recorded as forwarded."""
        lines = list(_REQUEST.finditer(data))
        struck = None
        with self._lock:
            for match in lines:
                end = data.find(b"\r\n\r\n", match.start())
                request_head = data[match.start():end if end >= 0 else len(data)]
                for trigger in self._armed:
                    _, _, method, path, after, head, _ = trigger
                    if ((method is None or match.group(1).decode() == method) and path.search(match.group(2))
                            and head.search(request_head)):
                        if after > 0:
                            trigger[4] -= 1
                        else:
                            struck = trigger, match.group(0).decode().strip()
                            self._armed.remove(trigger)
                        break
                if struck:
                    break
            if struck is None:
                now = time.time()
                self.requests.extend((now, m.group(0).decode().strip()) for m in lines)
                return False
        (mode, seconds, *_, hold), line = struck
        if hold:
            self._stop.wait(hold)
        self.outage(mode, seconds, trigger=line)
        return True

    def _pipe(self, client: socket.socket) -> None:
        """Forward bytes both ways until either side closes, the mode leaves ``pass`` or the proxy stops."""
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        if not self._track(client, upstream):
            _reset(client)
            _reset(upstream)
            return
        peer = {client: upstream, upstream: client}
        try:
            with selectors.DefaultSelector() as sel:
                for sock in peer:
                    sel.register(sock, selectors.EVENT_READ)
                while not self._stop.is_set():
                    for key, _ in sel.select(timeout=_TICK):
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        if key.fileobj is client and self._strike(data):
                            return  # the outage reset both sockets; this request is lost
                        peer[key.fileobj].sendall(data)
        except (OSError, ValueError):  # reset by an outage, or closed under us
            return
        finally:
            self._untrack(client, upstream)

    def _answer_503(self, client: socket.socket) -> None:
        """Read one request's head (bounded), answer 503 with an S3 error body, close."""
        try:
            client.settimeout(2)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    break
                head += chunk
            method = head.split(b" ", 1)[0]
            body = b"" if method == b"HEAD" else _BODY
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                           b"x-amz-request-id: fault-proxy\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(_BODY) + body)
            with self._lock:
                self.answered_503 += 1
        except OSError:
            pass
        finally:
            client.close()
