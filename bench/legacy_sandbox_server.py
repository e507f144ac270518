"""The sandbox's former hand-written HTTP/1.1 layer, kept only for ``bench/sandbox_cancels.py --compare``.

Run from the repository root::

    .venv/bin/python bench/legacy_sandbox_server.py --port 0 [--no-demo-links]

It serves the same :class:`sandbox.server.Sandbox` (same state, Plural paths, admin API,
faults) through the asyncio protocol and parser that ``sandbox/server.py`` and
``sandbox/wire.py`` held before the sandbox moved onto aiohttp, copied from that commit
with only what the benchmark needs (no 100-continue, no thread runner), so the two HTTP
layers are timed against the same work in the same run. Prints the same ready line.
Not part of the product: nothing outside ``bench/`` imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import struct
import sys
import time
import traceback
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plural_cancel.sandbox.replies import Reply, plural_error  # noqa: E402
from plural_cancel.sandbox.request import Request  # noqa: E402
from plural_cancel.sandbox.server import Sandbox  # noqa: E402

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
_PAUSE_AT = 1024 * 1024
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse(buf: bytearray) -> tuple[Request | None, bool, int]:
    """The first complete request in ``buf``: ``(request, keep_alive, bytes_consumed)``."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(431, "request headers too large")
        return None, False, 0
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest(411, "chunked bodies are not supported: send Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise BadRequest(400, "malformed Content-Length")
    length = int(length_text)
    if length > MAX_BODY:
        raise BadRequest(413, "request body too large")
    start = end + 4
    if len(buf) - start < length:
        return None, False, 0
    path, _, query = target.partition("?")
    request = Request(method, unquote(path), headers, bytes(buf[start:start + length]),
                      parse_qs(query) if query else {})
    conn = headers.get("connection", "").lower()
    keep_alive = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
    return request, keep_alive, start + length


_date_cache: list = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = ("Date: " + formatdate(now, usegmt=True) + "\r\n").encode("ascii")
    return _date_cache[1]


def render(status: int, body: bytes, content_type: str = "application/json",
           extra_headers: list[tuple[str, str]] | None = None, close: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Server: plural-sandbox\r\n")
    if extra_headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + _date_header() + b"\r\n" + body


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch, answer; one request at a time, in order."""

    def __init__(self, app: Sandbox, live: set):
        self.app = app
        self.live = live
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.paused = False
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.live.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._serve()
        elif len(self.buf) > _PAUSE_AT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _serve(self) -> None:
        while self.buf and not self.closed:
            try:
                req, keep_alive, used = parse(self.buf)
            except BadRequest as err:
                body = ('{"code":"INVALID_REQUEST","message":"%s"}' % err.message).encode()
                self.transport.write(render(err.status, body, close=True))
                self._close()
                return
            if req is None:
                return
            del self.buf[:used]
            try:
                reply = self.app.dispatch(req)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                reply = plural_error(500, "INTERNAL_ERROR", "sandbox bug: see its stderr")
            if reply.delay > 0:
                self.busy = True
                self.task = asyncio.get_running_loop().create_task(self._later(keep_alive, reply))
                return
            if not self._send(keep_alive, reply):
                return

    async def _later(self, keep_alive: bool, reply: Reply) -> None:
        try:
            await asyncio.sleep(reply.delay)
        except asyncio.CancelledError:
            return
        self.task = None
        if self.closed:
            return
        self.busy = False
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self._send(keep_alive, reply):
            self._serve()

    def _send(self, keep_alive: bool, reply: Reply) -> bool:
        if reply.reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed = True
            self.transport.abort()
            return False
        self.transport.write(render(reply.status, reply.body, reply.content_type, reply.headers,
                                    not keep_alive))
        if not keep_alive:
            self._close()
            return False
        return True

    def _close(self) -> None:
        self.closed = True
        self.transport.close()


async def _serve_forever(app: Sandbox, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    live: set = set()
    server = await loop.create_server(lambda: _Connection(app, live), host, port,
                                      reuse_address=True, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"sandbox listening on http://{host}:{bound}/api", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for conn in list(live):
            conn.closed = True
            conn.transport.abort()
        await server.wait_closed()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--client-secret", default=None)
    parser.add_argument("--no-demo-links", action="store_true")
    args = parser.parse_args()
    app = Sandbox(client_id=args.client_id, client_secret=args.client_secret,
                  seed_demo=not args.no_demo_links)
    asyncio.run(_serve_forever(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
