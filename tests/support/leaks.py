"""The leak scan: what must never leave the product, and one searchable blob of everything in Redis.

Never to be found in a log line, a Redis key or value, a Sentry envelope or a stored
error: an access token Plural issued, the client secret, and the personal data of the
customers on the links the workers handled (Plural's answers carry them whole).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterable

import redis

from plural_cancel.sandbox.links import personal_data

_BODY = re.compile(rb'"body": ?"([A-Za-z0-9+/=]+)"')
"""A kombu message's base64 body, inside a queued or unacknowledged message."""


def forbidden_values(sandbox, link_ids: Iterable[str], secret: str) -> set[str]:
    """Every access token ``sandbox`` has issued, ``secret``, and the personal data of
    ``link_ids`` as the sandbox serves them (e-mail, phone, names, address lines)."""
    values = {secret, *sandbox.issued_tokens()}
    for link_id in link_ids:
        values |= personal_data(sandbox.link(link_id))
    values.discard("")
    return values


def redis_dump(client: redis.Redis) -> bytes:
    """Every key and value of ``client``'s database (SCAN, then each key read by its type),
    and the decoded body of every kombu message among them, as one blob to search."""
    blobs: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        blobs.append(key)
        if kind == "string":
            blobs.append(client.get(key) or b"")
        elif kind == "hash":
            blobs.extend(v for kv in client.hgetall(key).items() for v in kv)
        elif kind == "list":
            blobs.extend(client.lrange(key, 0, -1))
        elif kind == "set":
            blobs.extend(client.smembers(key))
        elif kind == "zset":
            blobs.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            blobs.extend(v for _, fields in client.xrange(key) for kv in fields.items() for v in kv)
    text = b"\n".join(b if isinstance(b, bytes) else str(b).encode() for b in blobs)
    decoded = []
    for match in _BODY.finditer(text):
        try:
            decoded.append(base64.b64decode(match.group(1)))
        except (binascii.Error, ValueError):
            continue
    return b"\n".join([text, *decoded])


def found(blob: bytes, forbidden: Iterable[str]) -> list[str]:
    """The forbidden values present in ``blob``, each cut to its first 4 characters, so that
    a failing assert names what leaked without printing a secret whole."""
    return sorted(f"{value[:4]}..." for value in forbidden if value.encode() in blob)
