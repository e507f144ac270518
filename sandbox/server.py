"""The HTTP server: aiohttp's low-level server, one handler for every path.

:class:`Sandbox` holds the state and picks ``/api`` or ``/_admin`` for each request;
:class:`SandboxServer` runs it on a background thread for tests; :func:`serve` runs it
in the foreground until SIGTERM or SIGINT.

aiohttp (the ``sandbox`` extra) parses HTTP/1.1, keeps connections alive and answers
the requests of one connection in order, pipelined ones included. Its low-level
``web.Server`` with a single handler rather than an ``Application``: the sandbox routes
by itself (:meth:`Sandbox.dispatch`), and every layer skipped (router, middlewares,
access log) is CPU that a benchmark's sandbox does not spend (``bench/README.md``); for
the same reason it runs on uvloop's event loop when uvloop is installed. A held answer
(latency or timeout fault) is an ``asyncio.sleep`` in that request's handler: other
connections go on, and a client that hangs up ends the wait.
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
from urllib.parse import parse_qs, unquote

from aiohttp import HttpVersion11, web

from plural_cancel.sandbox.admin import Admin
from plural_cancel.sandbox.api import PluralAPI
from plural_cancel.sandbox.faults import FaultInjector, Faults
from plural_cancel.sandbox.replies import Reply, plural_error
from plural_cancel.sandbox.reqlog import RequestLog
from plural_cancel.sandbox.request import Request
from plural_cancel.sandbox.state import LinkStore
from plural_cancel.sandbox.tokens import Accounts, TokenStore

BACKLOG = 1024
"""Connections the kernel queues before the server accepts them (a benchmark opens many)."""
KEEPALIVE = 24 * 3600.0
"""Seconds an idle keep-alive connection stays open. Long: a worker's pooled connection
closed under it by the sandbox would show as a connection error the real Plural never
caused in the tests' counters."""
SHUTDOWN_GRACE = 0.1
"""Seconds a stop waits for answers still held (a timeout fault holds one ``hang_ms``)
before dropping them: a held answer is never sent after a stop."""

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_ZERO = struct.pack("ii", 1, 0)


class Sandbox:
    """Every piece of sandbox state, and the dispatch of one request to a :class:`Reply`."""

    def __init__(self, *, client_id: str | None = None, client_secret: str | None = None,
                 accounts: Accounts | None = None,
                 faults: Faults | Mapping[str, Any] | None = None, seed: int | None = None,
                 token_style: str = "expires_at", seed_demo: bool = True,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        """``seed`` makes fault dice and generated ids repeat; ``rng`` replaces the fault dice.

        The accounts are ``accounts`` (client id -> secret, or pairs) and the
        ``client_id``/``client_secret`` pair; with none, any credentials are accepted.
        ``clock`` returns epoch seconds (token expiry, link timestamps, expiry of links,
        the request log's arrival times, which the ``limit_rps`` window counts).
        """
        link_rng = random.Random(None if seed is None else f"links-{seed}")
        self.faults = FaultInjector(faults, rng=rng or random.Random(seed))
        self.store = LinkStore(clock=clock, rng=link_rng, seed_demo=seed_demo)
        self.tokens = TokenStore(client_id=client_id, client_secret=client_secret, accounts=accounts,
                                 clock=clock)
        self.log = RequestLog(clock=clock)
        self.api = PluralAPI(store=self.store, tokens=self.tokens, faults=self.faults,
                             log=self.log, token_style=token_style, clock=clock)
        self.admin = Admin(store=self.store, tokens=self.tokens, faults=self.faults, log=self.log)

    def dispatch(self, req: Request) -> Reply:
        path = req.path
        if path.startswith("/api/") or path == "/api":
            return self.api.handle(req)
        if path.startswith("/_admin/"):
            return self.admin.handle(req)
        return plural_error(404, "NOT_FOUND", f"no such endpoint: {path}")


def _handler(app: Sandbox) -> Callable[[web.BaseRequest], Any]:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = b""
        if request.can_read_body:
            if request.version == HttpVersion11 and \
                    request.headers.get("Expect", "").lower() == "100-continue":
                # curl waits a second for this before it sends a body of 1 KiB or more.
                await request.writer.write(_CONTINUE)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge as err:
                return _response(plural_error(413, "INVALID_REQUEST", err.text or "request body too large"))
        # The request target as sent, not aiohttp's ``path``: that one goes through yarl's
        # URL object on every call, and the sandbox needs only the path and the query.
        path, _, query = request.raw_path.partition("?")
        if "%" in path:
            path = unquote(path)
        try:
            reply = app.dispatch(Request(request.method, path, request.headers, body,
                                         parse_qs(query) if query else {}))
        except Exception:  # a sandbox bug must show as a 500 in Plural's shape, and on stderr
            traceback.print_exc(file=sys.stderr)
            reply = plural_error(500, "INTERNAL_ERROR", "sandbox bug: see its stderr")
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if reply.reset:
            _reset(request.transport)
            # Never written: aiohttp finds the connection gone and drops it without a word.
            return web.Response(status=500)
        return _response(reply)

    return handle


def _response(reply: Reply) -> web.Response:
    headers = {"Content-Type": reply.content_type, "Server": "plural-sandbox"}
    if reply.headers:
        headers.update(reply.headers)
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close the connection with a TCP RST: SO_LINGER 0 makes the kernel send RST, not FIN."""
    if transport is None:  # the client has gone already
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    transport.abort()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (the ``sandbox`` extra brings it where it
    builds), else asyncio's: aiohttp spends less CPU a request on it (``bench/README.md``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to (``port`` 0: a free one)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return socket.create_server(address, family=family, backlog=BACKLOG)


async def _start(app: Sandbox, host: str, port: int) -> tuple[web.ServerRunner, int]:
    """Listen and serve on the running loop; returns the runner (to clean up) and the port."""
    sock = _listen(host, port)
    server = web.Server(_handler(app), handler_cancellation=True, access_log=None,
                        keepalive_timeout=KEEPALIVE)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, sock.getsockname()[1]


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SandboxServer:
    """The sandbox on a background thread, for tests: ``start()``, ``url``, ``stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, client_id: str | None = None,
                 client_secret: str | None = None, accounts: Accounts | None = None,
                 faults: Mapping[str, Any] | None = None,
                 seed: int | None = None, token_style: str = "expires_at",
                 seed_demo: bool = True, clock: Callable[[], float] = time.time):
        """``port=0`` picks a free port (read it from ``.port`` after ``start()``)."""
        self.host = host
        self.port = port
        self.app = Sandbox(client_id=client_id, client_secret=client_secret, accounts=accounts,
                           faults=faults, seed=seed, token_style=token_style, seed_demo=seed_demo,
                           clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API base, e.g. ``http://127.0.0.1:8800/api``."""
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

    def set_faults(self, *, account: str | None = None, **changes: Any) -> Faults:
        """Partial update of the faults, as ``PUT /_admin/faults`` does (with ``account``, of
        that account's own, as ``PUT /_admin/accounts/{account}/faults``)."""
        return self.app.faults.update(changes, account=account)

    def start(self) -> "SandboxServer":
        """Listen and serve on a daemon thread; returns once the port is open."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                runner, self.port = loop.run_until_complete(_start(self.app, self.host, self.port))
            except BaseException as err:  # handed to start()'s caller
                failure.append(err)
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
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


def serve(host: str = "127.0.0.1", port: int = 8800, *, client_id: str | None = None,
          client_secret: str | None = None, accounts: Accounts | None = None,
          faults: Mapping[str, Any] | None = None,
          token_style: str = "expires_at", seed_demo: bool = True, seed: int | None = None,
          out: TextIO | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT.

    Prints ``sandbox listening on http://HOST:PORT/api`` (flushed) once the port is open.
    ``faults`` is a partial :class:`~sandbox.faults.Faults` dict; a bad one (or a bad
    account) raises ``ValueError`` before anything listens, a port that cannot be had
    ``OSError``.
    """
    app = Sandbox(client_id=client_id, client_secret=client_secret, accounts=accounts,
                  faults=faults, seed=seed, token_style=token_style, seed_demo=seed_demo)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve_forever(app, host, port, out or sys.stdout))


async def _serve_forever(app: Sandbox, host: str, port: int, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread: the caller stops us
            pass
    runner, bound = await _start(app, host, port)
    print(f"sandbox listening on {_base(host, bound)}/api", file=out, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
