"""A real HTTP server on 127.0.0.1 playing Plural, whose answers each test scripts.

For the Plural client's tests (``tests/test_plural_client.py``, ``tests/test_plural_transport.py``):
no mocking, every request crosses a real socket.
"""

from __future__ import annotations

import calendar
import datetime as dt
import ipaddress
import json
import socket
import ssl
import struct
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from plural_cancel.worker.tokens import MemoryTokenStore

NOW = calendar.timegm((2024, 7, 9, 7, 57, 8)) + 0.022
NOW_STAMP = "2024-07-09T07:57:08.022Z"
CLIENT_ID = "client-7f3a"
SECRET = "s3cr3t-DO-NOT-LEAK-91c2"
LINK_ID = "pl-v1-250306082755-aa-uT0noy"
UTC = dt.timezone.utc

# The seed's 200 example, verbatim from the OpenAPI definition beside the repo (its tabs
# and misspelt "adddress_type" included).
OPENAPI = Path(__file__).resolve().parents[1] / "data" / "cancel-payment-link.openapi.json"
SEED_200 = (json.loads(OPENAPI.read_text())["paths"]["/pay/v1/paymentlink/{payment_link_id}/cancel"]["put"]
            ["responses"]["200"]["content"]["application/json"]["examples"]["Result"]["value"])


@dataclass
class Answer:
    """One scripted answer: a status and body, or a stall (``delay`` seconds), or a reset, or a
    hang-up (``close``: the connection closed with no answer, a FIN rather than a reset; over
    TLS without a close_notify); ``trickle`` sends the body one byte every that many seconds."""

    status: int = 200
    body: Any = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False
    close: bool = False
    trickle: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: Any  # http.client.HTTPMessage: case-insensitive .get()
    body: bytes


class ScriptedPlural:
    """A threaded HTTP/1.1 server: token calls get fresh tokens unless scripted; other calls pop ``answers``."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.answers: deque[Answer] = deque()
        self.token_answers: deque[Answer] = deque()
        self.seen: list[Seen] = []
        self.issued: list[str] = []
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_request(self):
                length = int(self.headers.get("Content-Length") or 0)
                outer.seen.append(Seen(self.command, self.path, self.headers,
                                       self.rfile.read(length) if length else b""))
                outer.reply(self, outer.next_answer(self.path))

            do_GET = do_PUT = do_POST = handle_request

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients that gave up are expected
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/api"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def next_answer(self, path: str) -> Answer:
        if path.endswith("/auth/v1/token"):
            if self.token_answers:
                return self.token_answers.popleft()
            self.issued.append(f"tkn{len(self.issued) + 1}-{uuid.uuid4().hex}")
            return Answer(200, {"access_token": self.issued[-1], "expires_at": "2024-07-09T08:57:08.022Z"})
        return self.answers.popleft() if self.answers else Answer(599, {"code": "NOTHING_SCRIPTED"})

    def reply(self, handler: BaseHTTPRequestHandler, answer: Answer) -> None:
        if answer.delay:
            self.stop.wait(answer.delay)
        if answer.reset:
            # SO_LINGER with a zero timeout turns close() into a TCP RST.
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.rfile.close()
            handler.wfile.close()
            handler.connection.close()
            handler.close_connection = True
            return
        if answer.close:
            handler.rfile.close()
            handler.wfile.close()
            # shutdown() sends the FIN now; an SSLSocket's close() sends no close_notify.
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.connection.close()
            handler.close_connection = True
            return
        body, headers = answer.body, dict(answer.headers)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        payload = (body or "").encode() if not isinstance(body, bytes) else body
        try:
            handler.send_response(answer.status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if answer.trickle:
                for i in range(len(payload)):
                    handler.wfile.write(payload[i:i + 1])
                    handler.wfile.flush()
                    if self.stop.wait(answer.trickle):
                        return
            else:
                handler.wfile.write(payload)
        except OSError:
            pass  # the client timed out and left

    def calls(self, suffix: str = "") -> list[Seen]:
        return [s for s in self.seen if not s.path.endswith("/auth/v1/token") and s.path.endswith(suffix)]

    def token_calls(self) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/auth/v1/token")]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class RecordingStore(MemoryTokenStore):
    """The real in-memory store, noting which tokens the client asked it to drop."""

    def __init__(self):
        super().__init__(clock=lambda: NOW)
        self.invalidated: list[str] = []

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        super().invalidate(token)


def self_signed_tls(tmp_path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context
