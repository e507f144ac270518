"""Producer throughput: the batch publish against a plain ``apply_async`` loop, same run.

Run from the repository root::

    .venv/bin/python bench/enqueue_many.py [--count 10000] [--rounds 3]

It starts its own ``redis-server`` on a free port (no persistence) and, for each of
``--rounds`` rounds, on a flushed database:

- ``apply_async loop``: ``cancel_payment_link.apply_async(kwargs=...)`` once per link
  on one producer, as a producer would write it by hand: one message, nothing else;
- ``enqueue_many``: the ledger records and every link's message published at once
  (``tasks.producer.submit`` without ``hold``: ledger records pipelined, messages in
  pipelined batches by ``worker.publisher.publish``). That is how ``enqueue_many`` worked
  before a batch waited in the ledger's backlog, and still how fired schedules' and
  requeued dead letters' messages go out; ``bench/backlog.py`` measures today's
  ``enqueue_many``, which publishes only what the workers have room for.

After each run it checks that the ``celery`` list holds exactly ``--count`` messages
and that one of them, decoded, names the task and carries both keyword arguments.
It prints each run's time and rate and, per round, the ratio; the summary uses the
median round. No worker runs: this measures the producer's side only.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plural_cancel.config.settings import Settings  # noqa: E402
from plural_cancel.worker import create_app  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

app = None
"""The producer's app, built in :func:`main` for the bench's own Redis."""


def check_queue(client: redis.Redis, count: int) -> None:
    """Exactly ``count`` messages queued, and one of them is a well-formed cancel message."""
    queued = client.llen(app.settings.cancel_queue)
    if queued != count:
        sys.exit(f"expected {count} queued messages, found {queued}")
    message = json.loads(client.lindex(app.settings.cancel_queue, 0))
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    if message["headers"]["task"] != "tasks.cancel_payment_link" or set(kwargs) != {"payment_link_id",
                                                                                    "request_id"}:
        sys.exit(f"unexpected message: {message['headers']['task']} {kwargs}")


def run_apply_async(links: list[str]) -> float:
    """Seconds to send one message per link with ``apply_async`` on one producer."""
    import uuid

    from plural_cancel.tasks.cancel import cancel_payment_link

    pairs = [(link, str(uuid.uuid4())) for link in links]
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for link, request_id in pairs:
            cancel_payment_link.apply_async(kwargs={"payment_link_id": link, "request_id": request_id},
                                            producer=producer)
    return time.perf_counter() - start


def run_enqueue_many(links: list[str]) -> float:
    """Seconds for ledger records and every link's message, published at once."""
    from plural_cancel.tasks.producer import new_request_ids, submit

    start = time.perf_counter()
    submit(app, list(zip(new_request_ids(len(links)), links)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="links per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both runs")
    opts = parser.parse_args()

    server = RedisServer(prefix="bench-redis-")
    url = server.url
    try:
        global app
        app = create_app(Settings.from_env({"REDIS_URL": url}))
        client = redis.Redis.from_url(url)
        links = [f"pl-bench-{i:07d}" for i in range(opts.count)]
        # Warm both paths (connections, scripts, imports) before timing.
        run_apply_async(links[:10])
        run_enqueue_many(links[:10])
        ratios = []
        for round_ in range(1, opts.rounds + 1):
            timings = {}
            for label, run in (("apply_async loop", run_apply_async), ("enqueue_many", run_enqueue_many)):
                client.flushdb()
                seconds = run(links)
                check_queue(client, opts.count)
                timings[label] = seconds
                print(f"round {round_}  {label:17} {opts.count:6d} in {seconds:6.2f} s  "
                      f"= {opts.count / seconds:8.0f} /s")
            ratios.append(timings["apply_async loop"] / timings["enqueue_many"])
            print(f"round {round_}  enqueue_many is {ratios[-1]:.1f}x the apply_async loop")
        print(f"median: enqueue_many is {statistics.median(ratios):.1f}x as fast as an apply_async loop "
              f"({opts.count} links, {opts.rounds} rounds)")
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
