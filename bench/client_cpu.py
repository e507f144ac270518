"""The Plural client's own CPU per cancel: ``PluralClient.cancel_payment_link`` against the sandbox.

Run from the repository root (about 30 s)::

    .venv/bin/python bench/client_cpu.py [--count 3000] [--threads 1,128] [--latency-ms 200] [--rounds 2]

It starts ``python -m sandbox`` as a process and, per thread count and round, creates
``--count`` CREATED links, then cancels them through one client shared by that many
threads (each cancel inside ``within(20)``, as the task calls it; every answer checked
to be CANCELLED). It prints this process's CPU milliseconds per cancel (the client, its
HTTP stack and the link parsing: no Celery, no Redis) and cancels per second. Compare two
versions of the client by running it from each checkout with that checkout's own
``.venv`` (``make setup``): ``plural_cancel.worker`` and the other folders' subpackages come
from the install, whichever checkout ``PYTHONPATH`` names.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plural_cancel.worker.plural import USER_AGENT, PluralClient  # noqa: E402
from tests.support.sandbox import start_sandbox_process  # noqa: E402


def run(sandbox, count: int, threads: int) -> tuple[float, float]:
    """(CPU ms per cancel, cancels per second) for ``count`` cancels from ``threads`` threads."""
    ids = sandbox.create_links(count, prefix=f"pl-cpu{uuid.uuid4().hex[:8]}-")
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for link_id in ids:
        todo.put(link_id)
    with PluralClient(sandbox.url, "bench", "bench") as client:
        client.generate_token()  # warm: a connection and a token before the clock starts

        def work() -> None:
            while True:
                try:
                    link_id = todo.get_nowait()
                except queue.Empty:
                    return
                with client.within(20):
                    assert client.cancel_payment_link(link_id, str(uuid.uuid4())).status == "CANCELLED"

        workers = [threading.Thread(target=work) for _ in range(threads)]
        started, cpu = time.perf_counter(), time.process_time()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (time.process_time() - cpu) / count * 1000, count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="cancels per run")
    parser.add_argument("--threads", default="1,128", help="comma-separated thread counts")
    parser.add_argument("--latency-ms", type=float, default=200.0,
                        help="sandbox latency for runs of more than one thread")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    sandbox = start_sandbox_process(client_id="bench", client_secret="bench", extra_args=["--no-demo-links"])
    try:
        print(f"{USER_AGENT}; sandbox {sandbox.url}")
        for threads in (int(t) for t in args.threads.split(",")):
            # One thread at 0 ms measures the call itself; many threads need the latency to overlap.
            latency = args.latency_ms if threads > 1 else 0.0
            sandbox.set_faults(latency_ms=latency)
            figures = [run(sandbox, args.count, threads) for _ in range(args.rounds)]
            print(f"{threads:>4} threads, {latency:.0f} ms: "
                  + ", ".join(f"{ms:.2f} ms CPU/cancel {rate:.0f}/s" for ms, rate in figures), flush=True)
        return 0
    finally:
        sandbox.stop()


if __name__ == "__main__":
    raise SystemExit(main())
