"""A real forward proxy on 127.0.0.1 for the Plural client's proxy tests.

It tunnels ``CONNECT host:port`` (how an https base goes through ``HTTPS_PROXY``) and
forwards absolute-URI requests (``PUT http://host:port/path``, how an http base goes
through ``HTTP_PROXY``), and notes each request's ``Proxy-Authorization`` header. With
``credentials`` set it answers 407 to a request without them, as a proxy that demands
a login does.
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Passed:
    method: str
    target: str  # "host:port" for CONNECT, the absolute URI otherwise
    proxy_authorization: str | None


class ForwardProxy:
    """A threaded proxy; ``passed`` lists what came through it, in order."""

    def __init__(self, credentials: tuple[str, str] | None = None):
        self.passed: list[Passed] = []
        expected = None
        if credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def admitted(self) -> bool:
                auth = self.headers.get("Proxy-Authorization")
                outer.passed.append(Passed(self.command, self.path, auth))
                if expected is None or auth == expected:
                    return True
                body = b"<html>proxy login required</html>"
                self.send_response(407)
                self.send_header("Proxy-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return False

            def do_CONNECT(self):
                if not self.admitted():
                    return
                host, port = self.path.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)), timeout=10)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                _pipe(self.connection, upstream)
                self.close_connection = True

            def forward(self):
                if not self.admitted():
                    return
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")}
                upstream = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
                try:
                    upstream.request(self.command, url.path + (f"?{url.query}" if url.query else ""),
                                     body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, userinfo: str = "") -> str:
        """``http://[userinfo@]127.0.0.1:PORT``, the value of ``HTTPS_PROXY`` / ``HTTP_PROXY``."""
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ForwardProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (a CONNECT tunnel)."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 10)
            if not ready:
                return
            for source in ready:
                data = source.recv(65536)
                if not data:
                    return
                (b if source is a else a).sendall(data)
    except OSError:
        pass
    finally:
        b.close()
