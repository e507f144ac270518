"""Read cancel outcomes from the stream ``plural-cancel:events`` with a consumer group:
what an order service's expiry flow copies. Plain redis-py; no code of plural-cancel.

Every cancel that ends is appended once to the stream, with the fields ``request_id``,
``payment_link_id``, ``state``, ``outcome``, ``link_status``, ``at`` (and ``attempts``,
``follows`` where they apply). A consumer group hands each entry to one of its
consumers; the consumer acknowledges it (``XACK``) once handled. An entry handed out
and never acknowledged (its consumer crashed) stays pending: the same consumer gets it
again when it restarts under the same name, and any other consumer of the group takes
it over once it has been idle ``claim_idle_ms`` (``XAUTOCLAIM``). So every outcome is
handled at least once per group: make the handling idempotent (key it by
``request_id``), and it is handled effectively once.

Run it (one process per consumer name; as many as you like in one group)::

    python examples/outcome_consumer.py --redis-url redis://127.0.0.1:6379/0 \\
        --group order-expiry --consumer "$(hostname)"
"""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Callable

import redis

STREAM = "plural-cancel:events"

log = logging.getLogger("outcome_consumer")


def ensure_group(client: redis.Redis, group: str, start: str = "0") -> None:
    """Create the consumer group once (and the stream, if no cancel has ended yet).

    ``start``: ``"0"``, the group first reads every outcome the stream still holds;
    ``"$"``, only those that end from now on. A group that exists already is kept as it is.
    """
    try:
        client.xgroup_create(STREAM, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def decide(event: dict[str, str]) -> str:
    """What an order-expiry flow does with one outcome: ``expire``, ``keep_paid`` or ``review``.

    - ``succeeded`` (``cancelled`` or ``already_cancelled``): nobody can pay the link any
      more; expire the order.
    - ``not_cancellable`` with ``link_status`` ``PROCESSED``: the customer paid. Do not
      expire the order; fulfil it.
    - ``not_cancellable`` with ``EXPIRED``: the link expired on its own; nobody can pay it.
    - anything else (``PARTIAL_PROCESSED``, ``rejected``, ``gave_up``, ``auth_failed``):
      a person looks at it (``plural-cancel status REQUEST_ID``).
    """
    if event.get("state") == "succeeded":
        return "expire"
    if event.get("outcome") == "not_cancellable":
        if event.get("link_status") == "PROCESSED":
            return "keep_paid"
        if event.get("link_status") == "EXPIRED":
            return "expire"
    return "review"


class OutcomeConsumer:
    """One consumer of a group on the outcome stream.

    ``handle(entry_id, event)`` is called for each entry, then the entry is acknowledged.
    If ``handle`` raises, the entry is not acknowledged: it stays pending and comes back
    (to this consumer on restart, or to another after ``claim_idle_ms``).
    """

    def __init__(self, client: redis.Redis, group: str, consumer: str,
                 handle: Callable[[str, dict[str, str]], None], *, count: int = 100, block_ms: int = 5000,
                 claim_idle_ms: int = 60_000):
        self.client = client
        self.group = group
        self.consumer = consumer
        self.handle = handle
        self.count = count
        self.block_ms = block_ms
        """Milliseconds one read waits for new entries."""
        self.claim_idle_ms = claim_idle_ms
        """Milliseconds an entry handed to another consumer may go unacknowledged before this
        one takes it over: longer than that consumer ever takes to handle one."""
        self._own_pending = True  # after a (re)start, first what this name was handed and never acked
        self._claim_cursor = "0-0"

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Handle entries until ``stop()`` says so."""
        while not stop():
            self.run_once()

    def run_once(self) -> int:
        """One round; returns how many entries were handled."""
        if self._own_pending:
            # Id "0": the entries already handed to this consumer name and not acknowledged.
            entries = self._read("0", block=None)
            if entries:
                return self._handle_all(entries)
            self._own_pending = False
        # Entries another consumer of the group was handed and never acknowledged (it crashed).
        # Entries trimmed from the stream meanwhile are dropped from the pending list by Redis.
        # A cursor through the group's pending list, back to its start once at its end.
        cursor, claimed, *_ = self.client.xautoclaim(STREAM, self.group, self.consumer, self.claim_idle_ms,
                                                     start_id=self._claim_cursor, count=self.count)
        self._claim_cursor = _text(cursor)
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        if claimed:
            return self._handle_all(claimed)
        return self._handle_all(self._read(">", block=self.block_ms))

    def _read(self, start: str, block: int | None) -> list:
        reply = self.client.xreadgroup(self.group, self.consumer, {STREAM: start}, count=self.count, block=block)
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries if fields]

    def _handle_all(self, entries: list) -> int:
        for entry_id, fields in entries:
            event = {_text(k): _text(v) for k, v in fields.items()}
            self.handle(_text(entry_id), event)
            self.client.xack(STREAM, self.group, entry_id)
        return len(entries)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--group", default="order-expiry")
    parser.add_argument("--consumer", default=socket.gethostname())
    parser.add_argument("--from-start", action="store_true", help="a new group reads the stream from its start")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    client = redis.Redis.from_url(args.redis_url)
    ensure_group(client, args.group, "0" if args.from_start else "$")

    def handle(entry_id: str, event: dict[str, str]) -> None:
        # Your order service here, idempotent by request_id (a redelivery must change nothing).
        action = decide(event)
        log.info("%s: %s %s (%s, link %s)", action, event["request_id"], event.get("outcome"),
                 event.get("link_status") or "-", event.get("payment_link_id"))

    OutcomeConsumer(client, args.group, args.consumer, handle).run()


if __name__ == "__main__":
    main()
