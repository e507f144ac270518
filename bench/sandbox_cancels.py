"""Sandbox cancels per second: is the local Plural ever the bottleneck of a benchmark?

Run from the repository root::

    .venv/bin/python bench/sandbox_cancels.py [--count 20000] [--rounds 1] [--no-raw] [--compare]

It starts ``python -m sandbox`` (aiohttp, on uvloop) as a process, creates ``--count`` CREATED links per
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
one successful cancel per link, and says whether one ``http.client`` connection got the
:data:`AIM`.

``--compare`` also starts ``bench/legacy_sandbox_server.py``, the same sandbox behind the
hand-written HTTP/1.1 layer it had before aiohttp (``legacy``), and the sandbox on
asyncio's own event loop instead of uvloop's (``asyncio``), and times the three in the
same run, in turns (the order flipped every round), then prints each one's figures over
the legacy's.
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
LEGACY = Path(__file__).resolve().parent / "legacy_sandbox_server.py"
"""The former hand-written HTTP layer over the same sandbox, for ``--compare``."""
ASYNCIO_LOOP = [sys.executable, "-c", "import sys; sys.modules['uvloop'] = None\n"
                "from plural_cancel.sandbox.cli import main; raise SystemExit(main(sys.argv[1:]))"]
"""``python -m sandbox`` with uvloop made unimportable: aiohttp on asyncio's own loop, for ``--compare``."""
AIM = 2000
"""Cancels a second the sandbox must answer one ``http.client`` keep-alive connection."""


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


def _rounds_order(servers: list[str], round_: int) -> list[str]:
    """Servers in turn, the order flipped every round: drift on a shared machine hits each alike."""
    return servers if round_ % 2 == 0 else servers[::-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="cancels per client and round")
    parser.add_argument("--rounds", type=int, default=1, help="best of this many rounds")
    parser.add_argument("--no-raw", action="store_true", help="skip the http.client client")
    parser.add_argument("--no-requests", action="store_true",
                        help="skip the requests client (its rounds are the slow part: it is the bottleneck)")
    parser.add_argument("--compare", action="store_true",
                        help="also time the former hand-written HTTP layer (bench/legacy_sandbox_server.py)")
    args = parser.parse_args(argv)

    clients = ([] if args.no_requests else ["requests"]) + ([] if args.no_raw else ["http.client"])
    if not clients:
        parser.error("--no-raw and --no-requests leave no client")
    procs = {}
    trivial = None
    try:
        procs["aiohttp"] = start_sandbox_process(extra_args=["--no-demo-links"])
        if args.compare:
            procs["asyncio"] = start_sandbox_process(extra_args=["--no-demo-links"], command=ASYNCIO_LOOP)
            procs["legacy"] = start_sandbox_process(extra_args=["--no-demo-links"],
                                                    command=[sys.executable, str(LEGACY)])
        trivial, trivial_port = _start_trivial()
        per_server = args.count * len(clients) * args.rounds
        batches, headers = {}, {}
        for server, proc in procs.items():
            started = time.perf_counter()
            ids = proc.create_links(per_server, prefix="pl-bench-")
            created = time.perf_counter() - started
            token = requests.post(proc.url + "/auth/v1/token", json=CREDENTIALS,
                                  timeout=10).json()["access_token"]
            headers[server] = {"Authorization": f"Bearer {token}", "Request-ID": "bench-0001",
                               "Content-Type": "application/json"}
            batches[server] = iter(ids[i:i + args.count] for i in range(0, len(ids), args.count))
            print(f"{server} sandbox pid {proc.proc.pid} at {proc.url}; {per_server} links created "
                  f"through /_admin/links in {created:.2f} s")
        print(f"{os.cpu_count()} CPUs; best of {args.rounds} rounds of {args.count} calls"
              + ("; the servers take turns, the order flipped every round" if args.compare else ""))
        print(f"{'server':<9}{'client (one keep-alive connection)':<36}{'cancels/s':>10}{'health/s':>10}"
              f"{'trivial/s':>11}{'cancels/trivial':>17}{'sandbox CPU/cancel':>20}")
        results: dict[tuple[str, str], dict[str, float]] = {}
        for name in clients:
            best = {server: {"cancel": 0.0, "health": 0.0, "cpu": float("inf")} for server in procs}
            best_trivial = 0.0
            for round_ in range(args.rounds):
                for server in _rounds_order(list(procs), round_):
                    proc = procs[server]
                    if name == "requests":
                        cancels, get = _with_session(proc.base, headers[server])
                    else:
                        cancels, get = _with_http_client(proc.port, headers[server])
                    batch = next(batches[server])
                    cpu_before = _cpu_seconds(proc.proc.pid)
                    rate = _per_second(len(batch), lambda: cancels(batch))
                    cpu = (_cpu_seconds(proc.proc.pid) - cpu_before) / len(batch)
                    health = _per_second(args.count, lambda: get(args.count))
                    got = best[server]
                    got.update(cancel=max(got["cancel"], rate), health=max(got["health"], health),
                               cpu=min(got["cpu"], cpu))
                if name == "requests":
                    _, get = _with_session(f"http://127.0.0.1:{trivial_port}", {})
                    target: object = f"http://127.0.0.1:{trivial_port}/"
                else:
                    _, get = _with_http_client(trivial_port, {})
                    target = trivial_port
                best_trivial = max(best_trivial, _per_second(args.count, lambda: get(args.count, target)))
            for server, got in best.items():
                results[server, name] = got
                print(f"{server:<9}{name:<36}{got['cancel']:>10.0f}{got['health']:>10.0f}"
                      f"{best_trivial:>11.0f}{got['cancel'] / best_trivial:>17.2f}{got['cpu'] * 1e6:>17.0f} us")
        if args.compare:
            for server in ("aiohttp", "asyncio"):
                for name in clients:
                    new, old = results[server, name], results["legacy", name]
                    print(f"{server} / legacy, {name}: cancels/s {new['cancel'] / old['cancel']:.2f}, "
                          f"health/s {new['health'] / old['health']:.2f}, "
                          f"CPU per cancel {new['cpu'] / old['cpu']:.2f}")
        if "http.client" in clients:
            rate = results["aiohttp", "http.client"]["cancel"]
            print(f"aim: at least {AIM:,} cancels/s on one http.client connection: {rate:,.0f}/s, "
                  + ("met" if rate >= AIM else "NOT met"))
        for server, proc in procs.items():
            lowest_cpu = min(results[server, name]["cpu"] for name in clients)
            print(f"{server}: at {lowest_cpu * 1e6:.0f} us of CPU per cancel, one sandbox process could "
                  f"answer about {1 / lowest_cpu:.0f} cancels/s if its clients cost nothing")
        failed = False
        for server, proc in procs.items():
            stats = proc.stats()
            print(f"{server} sandbox counted {stats['cancel_count']} successful cancels for {per_server} "
                  f"links ({stats['by_status']['CANCELLED']} CANCELLED)")
            failed |= stats["cancel_count"] != per_server
        if failed:
            return 1
    finally:
        for proc in procs.values():
            proc.stop()
        if trivial is not None:
            trivial.kill()
            trivial.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
