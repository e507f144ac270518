"""A loopback HTTP server posing as Sentry: it accepts envelopes and keeps them for tests.

``DSN http://key@127.0.0.1:PORT/1`` points a real sentry-sdk at it; the SDK sends its
real envelopes (gzip-compressed by default) to ``POST /api/1/envelope/``.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Envelope:
    """One envelope: its header and its items as (item header, payload bytes)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        """The whole envelope, decompressed: what a leak test searches."""
        lines = raw.split(b"\n", 1)
        self.header = json.loads(lines[0] or b"{}")
        self.items: list[tuple[dict[str, Any], bytes]] = []
        rest = lines[1] if len(lines) > 1 else b""
        while rest.strip():
            head, _, rest = rest.partition(b"\n")
            item = json.loads(head)
            if "length" in item:
                payload, rest = rest[:item["length"]], rest[item["length"]:]
                rest = rest[1:] if rest.startswith(b"\n") else rest
            else:
                payload, _, rest = rest.partition(b"\n")
            self.items.append((item, payload))

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        """The JSON payloads of items of type ``kind`` (``event``, ``check_in``...)."""
        return [json.loads(p) for item, p in self.items if item.get("type") == kind]


class FakeSentry:
    """Threaded HTTP server on 127.0.0.1; ``dsn`` for the SDK, ``envelopes()`` for asserts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._envelopes: list[Envelope] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # only when the SDK found brotli installed

                    body = brotli.decompress(body)
                if self.path.rstrip("/").endswith("/envelope"):
                    with owner._lock:
                        owner._envelopes.append(Envelope(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.dsn = f"http://publickey@127.0.0.1:{self.port}/1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def envelopes(self) -> list[Envelope]:
        with self._lock:
            return list(self._envelopes)

    def events(self) -> list[dict[str, Any]]:
        """Every error/message event received so far."""
        return [e for env in self.envelopes() for e in env.payloads("event")]

    def check_ins(self) -> list[dict[str, Any]]:
        return [c for env in self.envelopes() for c in env.payloads("check_in")]

    def raw(self) -> bytes:
        """Every envelope received, decompressed, end to end."""
        return b"\n".join(env.raw for env in self.envelopes())

    def wait_for_events(self, predicate, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events satisfy ``predicate``; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if predicate(e)]
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def clear(self) -> None:
        with self._lock:
            self._envelopes.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
