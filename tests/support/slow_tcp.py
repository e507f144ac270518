"""A TCP relay on 127.0.0.1 that holds each chunk a client sends for ``delay`` seconds before
passing it on: a Redis that is far away (another region), for ``plural-cancel check``."""

from __future__ import annotations

import socket
import threading
import time


class SlowRelay:
    """Relays ``127.0.0.1:port`` to ``target`` (host, port), each request ``delay`` seconds late."""

    def __init__(self, target: tuple[str, int], delay: float):
        self.target, self.delay = target, delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while chunk := source.recv(65536):
                time.sleep(delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()

    def close(self) -> None:
        self._server.close()
