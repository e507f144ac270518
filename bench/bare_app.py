"""The bare baseline for ``bench/pipeline.py``: a Celery task that only makes the cancel's HTTP call.

Started by the bench as::

    celery -A bench.bare_app -b redis://... worker --pool threads -c 128 -Q bench-bare

with ``BENCH_PLURAL_URL`` (the API base, ``http://127.0.0.1:N/api``) and
``BENCH_PLURAL_TOKEN`` (a bearer token the driver fetched once from the sandbox's
``/api/auth/v1/token``) in the environment.

The task does what the product's task must do at the least, and nothing else: one
``PUT /pay/v1/paymentlink/{id}/cancel`` with the product's headers through one
``requests.Session`` shared by the process's threads (as the product's client: one
HTTPAdapter of 128 connections, no retries, no environment look-ups, the same timeouts,
redirects not followed), a check that the answer is a 200 whose JSON says ``CANCELLED``, and one
pipelined ``INCR`` in Redis (``done`` or ``bad``) so that the driver sees it finish. No
ledger, no lease, no limiter, no breaker, no token cache. The Celery settings that shape
delivery are the product's: late acks, prefetch 1, no results, JSON. Logging is Celery's
own (its "received" and "succeeded" lines at ``--loglevel=INFO``, plain text).

``bench.bare_sleep`` (the bench's ``--modes ...,sleep``) makes no call at all: it sleeps for
the sandbox's latency and counts itself done, which measures Celery's own ceiling.
"""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime, timezone

import redis
import requests
from celery import Celery
from requests.adapters import HTTPAdapter

QUEUE = "bench-bare"
DONE_KEY = "bench:bare:done"
BAD_KEY = "bench:bare:bad"
POOL_SIZE = 128  # the product's DEFAULT_CONCURRENCY and its client's POOL_SIZE
TIMEOUT = (3.05, 10.0)  # the product's default connect and read timeouts, seconds
USER_AGENT = f"plural-cancel/0.1.0 python-requests/{requests.__version__}"

# The broker URL comes from the command line (`celery -b URL`), which Celery puts in
# CELERY_BROKER_URL before importing this module.
app = Celery("bare_cancel")
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    broker_pool_limit=POOL_SIZE + 4,
)

# Built on first use by the worker's threads (after the broker URL is known); two threads
# racing there build one spare, which is dropped.
@functools.cache
def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # as the product's: no proxy or CA look-up in the environment per call
    adapter = HTTPAdapter(pool_maxsize=POOL_SIZE, max_retries=0, pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url, max_connections=256)


@app.task(name="bench.bare_cancel")
def bare_cancel(payment_link_id: str, request_id: str) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Request-ID": request_id,
        "Request-Timestamp": now,
        "User-Agent": USER_AGENT,
        "Authorization": f"Bearer {os.environ['BENCH_PLURAL_TOKEN']}",
    }
    url = f"{os.environ['BENCH_PLURAL_URL']}/pay/v1/paymentlink/{payment_link_id}/cancel"
    ok = False
    try:
        response = _session().put(url, headers=headers, timeout=TIMEOUT, allow_redirects=False)
        ok = response.status_code == 200 and json.loads(response.content).get("status") == "CANCELLED"
    except (requests.RequestException, ValueError):
        pass
    pipe = _redis().pipeline(transaction=False)
    pipe.incr(DONE_KEY if ok else BAD_KEY)
    pipe.set("bench:bare:last", repr(time.time()))
    pipe.execute()


@app.task(name="bench.bare_sleep")
def bare_sleep(payment_link_id: str, request_id: str, seconds: float) -> None:
    """No HTTP at all: sleep as long as the sandbox's added latency, then count. Celery's own ceiling."""
    time.sleep(seconds)
    pipe = _redis().pipeline(transaction=False)
    pipe.incr(DONE_KEY)
    pipe.set("bench:bare:last", repr(time.time()))
    pipe.execute()

