"""Placeholder until the malformed-message counter lands (count, counts, reasons)."""

from __future__ import annotations

import redis

from worker.keys import Keys

BAD_ARGUMENTS = "bad_arguments"


def count(client: redis.Redis, keys: Keys, reason: str) -> None:
    client.hincrby(f"{keys.prefix}:malformed", reason, 1)


def counts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(f"{keys.prefix}:malformed").items()}
