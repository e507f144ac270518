"""The HTTP server: one asyncio event loop, keep-alive connections, answers in one send.

:class:`Sandbox` holds the state and picks ``/api`` or ``/_admin`` for each request;
:class:`SandboxServer` runs it on a background thread for tests; :func:`serve` runs it
in the foreground until SIGTERM or SIGINT.

Requests on one connection are answered in order. A held answer (latency or timeout
fault) is an ``asyncio.sleep`` on that connection only: other connections go on.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping, TextIO

from plural_cancel.sandbox import wire
from plural_cancel.sandbox.admin import Admin
from plural_cancel.sandbox.api import PluralAPI
from plural_cancel.sandbox.faults import FaultInjector, Faults
from plural_cancel.sandbox.replies import Reply, plural_error
from plural_cancel.sandbox.reqlog import RequestLog
from plural_cancel.sandbox.state import LinkStore
from plural_cancel.sandbox.tokens import TokenStore

_PAUSE_AT = 1024 * 1024
"""Bytes buffered from a client whose answer is held before we stop reading from it."""


class Sandbox:
    """Every piece of sandbox state, and the dispatch of one request to a :class:`Reply`."""

    def __init__(self, *, client_id: str | None = None, client_secret: str | None = None,
                 faults: Faults | Mapping[str, Any] | None = None, seed: int | None = None,
                 token_style: str = "expires_at", seed_demo: bool = True,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        """``seed`` makes fault dice and generated ids repeat; ``rng`` replaces the fault dice.

        ``clock`` returns epoch seconds (token expiry, link timestamps, expiry of links).
        """
        link_rng = random.Random(None if seed is None else f"links-{seed}")
        self.faults = FaultInjector(faults, rng=rng or random.Random(seed))
        self.store = LinkStore(clock=clock, rng=link_rng, seed_demo=seed_demo)
        self.tokens = TokenStore(client_id=client_id, client_secret=client_secret, clock=clock)
        self.log = RequestLog(clock=clock)
        self.api = PluralAPI(store=self.store, tokens=self.tokens, faults=self.faults,
                             log=self.log, token_style=token_style, clock=clock)
        self.admin = Admin(store=self.store, tokens=self.tokens, faults=self.faults, log=self.log)

    def dispatch(self, req: wire.Request) -> Reply:
        path = req.path
        if path.startswith("/api/") or path == "/api":
            return self.api.handle(req)
        if path.startswith("/_admin/"):
            return self.admin.handle(req)
        return plural_error(404, "NOT_FOUND", f"no such endpoint: {path}")


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
        self.continued = False
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

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
                req, used, wants_continue = wire.parse(self.buf)
            except wire.BadRequest as err:
                body = ('{"code":"INVALID_REQUEST","message":"%s"}' % err.message).encode()
                self.transport.write(wire.render(err.status, body, close=True))
                self._close()
                return
            if req is None:
                if wants_continue and not self.continued:
                    self.continued = True
                    self.transport.write(wire.CONTINUE)
                return
            del self.buf[:used]
            self.continued = False
            try:
                reply = self.app.dispatch(req)
            except Exception:  # a sandbox bug must show as a 500, not a dead connection
                traceback.print_exc(file=sys.stderr)
                reply = plural_error(500, "INTERNAL_ERROR", "sandbox bug: see its stderr")
            if reply.delay > 0:
                self.busy = True
                self.task = asyncio.get_running_loop().create_task(self._later(req, reply))
                return
            if not self._send(req, reply):
                return

    async def _later(self, req: wire.Request, reply: Reply) -> None:
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
        if self._send(req, reply):
            self._serve()

    def _send(self, req: wire.Request, reply: Reply) -> bool:
        """Write the answer; False when the connection is gone afterwards."""
        if reply.reset:
            self._reset()
            return False
        close = not req.keep_alive
        self.transport.write(wire.render(reply.status, reply.body, reply.content_type,
                                         reply.headers, close))
        if close:
            self._close()
            return False
        return True

    def _close(self) -> None:
        self.closed = True
        self.transport.close()

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.closed = True
        self.transport.abort()


async def _open(app: Sandbox, host: str, port: int) -> tuple[asyncio.Server, set]:
    live: set = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(app, live), host, port,
                                      reuse_address=True, backlog=1024)
    return server, live


async def _close(server: asyncio.Server, live: set) -> None:
    server.close()
    tasks = [conn.task for conn in list(live) if conn.task is not None]
    for conn in list(live):
        conn.closed = True
        conn.transport.abort()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SandboxServer:
    """The sandbox on a background thread, for tests: ``start()``, ``url``, ``stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, client_id: str | None = None,
                 client_secret: str | None = None, faults: Mapping[str, Any] | None = None,
                 seed: int | None = None, token_style: str = "expires_at",
                 seed_demo: bool = True, clock: Callable[[], float] = time.time):
        """``port=0`` picks a free port (read it from ``.port`` after ``start()``)."""
        self.host = host
        self.port = port
        self.app = Sandbox(client_id=client_id, client_secret=client_secret, faults=faults,
                           seed=seed, token_style=token_style, seed_demo=seed_demo, clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API base, e.g. ``http://127.0.0.1:8765/api``."""
        return _base(self.host, self.port) + "/api"

    @property
    def admin_url(self) -> str:
        return _base(self.host, self.port) + "/_admin"

    @property
    def store(self) -> LinkStore:
        return self.app.store

    @property
    def log(self) -> RequestLog:
        return self.app.log

    def set_faults(self, **changes: Any) -> Faults:
        """Partial update of the faults, as ``PUT /_admin/faults`` does."""
        return self.app.faults.update(changes)

    def start(self) -> "SandboxServer":
        """Listen and serve on a daemon thread; returns once the port is open."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                server, live = loop.run_until_complete(_open(self.app, self.host, self.port))
            except BaseException as err:  # handed to start()'s caller
                failure.append(err)
                loop.close()
                ready.set()
                return
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(_close(server, live))
                loop.close()

        self._thread = threading.Thread(target=run, name="plural-sandbox", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; wait for the thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8765, *, client_id: str | None = None,
          client_secret: str | None = None, faults: Mapping[str, Any] | None = None,
          token_style: str = "expires_at", seed_demo: bool = True, seed: int | None = None,
          out: TextIO | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT.

    Prints ``sandbox listening on http://HOST:PORT/api`` (flushed) once the port is open.
    ``faults`` is a partial :class:`~sandbox.faults.Faults` dict; a bad one raises
    ``ValueError`` before anything listens.
    """
    app = Sandbox(client_id=client_id, client_secret=client_secret, faults=faults, seed=seed,
                  token_style=token_style, seed_demo=seed_demo)
    asyncio.run(_serve_forever(app, host, port, out or sys.stdout))


async def _serve_forever(app: Sandbox, host: str, port: int, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread: the caller stops us
            pass
    server, live = await _open(app, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"sandbox listening on {_base(host, bound)}/api", file=out, flush=True)
    try:
        await stop.wait()
    finally:
        await _close(server, live)
