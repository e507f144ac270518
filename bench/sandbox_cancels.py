"""Sandbox cancels per second: is the local Plural ever the bottleneck of a benchmark?

Run from the repository root::

    .venv/bin/python bench/sandbox_cancels.py [--count 20000] [--rounds 1] [--no-raw]

It starts ``python -m sandbox`` as a process, creates ``--count`` CREATED links per
client and round through ``POST /_admin/links``, takes one token, then for each client
in turn, over one keep-alive connection:

- ``requests``: a ``requests.Session`` (what the worker's Plural client uses);
- ``http.client``: a bare ``http.client.HTTPConnection`` (unless ``--no-raw``);

measures ``--count`` sequential cancels (``PUT .../cancel``, every answer checked to be
200) and two baselines of the same client in the same run:

- ``health``: ``--count`` sequential ``GET /_admin/health`` on the sandbox (its HTTP
  layer, no work behind it);
- ``trivial``: ``--count`` sequential GETs to a minimal server that answers every read
  with the same fixed bytes, without even parsing (the client's own ceiling).

The ratio cancels/trivial is how much of the client's ceiling is left once the sandbox
does a cancel's work: near 1 means the client, not the sandbox, sets the pace. Each
figure is the best of ``--rounds``. It also reads the sandbox process's CPU time
(``/proc``) over the cancels: CPU per cancel gives the rate one sandbox process could
serve if its clients cost nothing. Finally it checks that the sandbox counted exactly
one successful cancel per link.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.sandbox import start_sandbox_process  # noqa: E402

CREDENTIALS = {"client_id": "bench", "client_secret": "bench", "grant_type": "client_credentials"}


# Thread per connection, one fixed answer per read: sequential clients send one request per
# write, and nothing is parsed, so this is as close to free as a Python server gets.
TRIVIAL_SERVER = r'''
import socket, sys, threading
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n" \
         b'{"status":"ok"}'
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(65536):
        conn.sendall(ANSWER)
    conn.close()
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
'''


def _start_trivial() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER], stdout=subprocess.PIPE,
                            text=True)
    return proc, int(proc.stdout.readline())


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_second(count: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def _with_session(base: str, headers: dict[str, str]) -> tuple[Callable, Callable]:
    session = requests.Session()
    session.headers.update(headers)

    def cancels(ids: list[str]) -> None:
        for link_id in ids:
            response = session.put(f"{base}/api/pay/v1/paymentlink/{link_id}/cancel", timeout=10)
            if response.status_code != 200:
                raise SystemExit(f"cancel {link_id}: HTTP {response.status_code} {response.text}")

    def get(count: int, url: str = f"{base}/_admin/health") -> None:
        for _ in range(count):
            session.get(url, timeout=10).raise_for_status()

    return cancels, get


def _with_http_client(port: int, headers: dict[str, str]) -> tuple[Callable, Callable]:
    conns: dict[int, http.client.HTTPConnection] = {}

    def connection(to_port: int) -> http.client.HTTPConnection:
        if to_port not in conns:
            conns[to_port] = http.client.HTTPConnection("127.0.0.1", to_port, timeout=10)
        return conns[to_port]

    def cancels(ids: list[str]) -> None:
        conn = connection(port)
        for link_id in ids:
            conn.request("PUT", f"/api/pay/v1/paymentlink/{link_id}/cancel", headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise SystemExit(f"cancel {link_id}: HTTP {response.status} {body!r}")

    def get(count: int, to_port: int = port) -> None:
        conn = connection(to_port)
        for _ in range(count):
            conn.request("GET", "/_admin/health")
            response = conn.getresponse()
            response.read()

    return cancels, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="cancels per client and round")
    parser.add_argument("--rounds", type=int, default=1, help="best of this many rounds")
    parser.add_argument("--no-raw", action="store_true", help="skip the http.client client")
    args = parser.parse_args(argv)

    clients = ["requests"] + ([] if args.no_raw else ["http.client"])
    proc = start_sandbox_process(extra_args=["--no-demo-links"])
    trivial, trivial_port = _start_trivial()
    try:
        started = time.perf_counter()
        ids = proc.create_links(args.count * len(clients) * args.rounds, prefix="pl-bench-")
        created = time.perf_counter() - started
        token = requests.post(proc.url + "/auth/v1/token", json=CREDENTIALS,
                              timeout=10).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Request-ID": "bench-0001",
                   "Content-Type": "application/json"}
        print(f"sandbox pid {proc.proc.pid} at {proc.url}; {os.cpu_count()} CPUs; "
              f"{len(ids)} links created through /_admin/links in {created:.2f} s; "
              f"best of {args.rounds} rounds of {args.count} calls")
        print(f"{'client (one keep-alive connection)':<36}{'cancels/s':>10}{'health/s':>10}"
              f"{'trivial/s':>11}{'cancels/trivial':>17}{'sandbox CPU/cancel':>20}")
        batches = iter(ids[i:i + args.count] for i in range(0, len(ids), args.count))
        lowest_cpu = float("inf")
        for name in clients:
            best = {"cancel": 0.0, "health": 0.0, "trivial": 0.0}
            cpu_per_cancel = float("inf")
            for _ in range(args.rounds):
                if name == "requests":
                    cancels, get = _with_session(proc.base, headers)
                    target: object = f"http://127.0.0.1:{trivial_port}/"
                else:
                    cancels, get = _with_http_client(proc.port, headers)
                    target = trivial_port
                batch = next(batches)
                cpu_before = _cpu_seconds(proc.proc.pid)
                cancel_rate = _per_second(len(batch), lambda: cancels(batch))
                cpu_per_cancel = min(cpu_per_cancel,
                                     (_cpu_seconds(proc.proc.pid) - cpu_before) / len(batch))
                rates = {"cancel": cancel_rate,
                         "health": _per_second(args.count, lambda: get(args.count)),
                         "trivial": _per_second(args.count, lambda: get(args.count, target))}
                best = {k: max(best[k], rates[k]) for k in best}
            print(f"{name:<36}{best['cancel']:>10.0f}{best['health']:>10.0f}"
                  f"{best['trivial']:>11.0f}{best['cancel'] / best['trivial']:>17.2f}"
                  f"{cpu_per_cancel * 1e6:>17.0f} us")
            lowest_cpu = min(lowest_cpu, cpu_per_cancel)
        print(f"at {lowest_cpu * 1e6:.0f} us of CPU per cancel, one sandbox process could "
              f"answer about {1 / lowest_cpu:.0f} cancels/s if its clients cost nothing")
        stats = proc.stats()
        print(f"sandbox counted {stats['cancel_count']} successful cancels for {len(ids)} links "
              f"({stats['by_status']['CANCELLED']} CANCELLED)")
        if stats["cancel_count"] != len(ids):
            return 1
    finally:
        proc.stop()
        trivial.kill()
        trivial.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
