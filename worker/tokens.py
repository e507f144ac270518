"""The Plural access token and the stores the client takes it from: in memory, or shared through Redis.

In Redis: one token per client id. It is refreshed 60 s before it expires (a quarter of
its life before, for a token that lives under 4 minutes: see :func:`refresh_margin`), by
one process at a time (a single-flight lock: N processes needing a token cause one
Generate Token call, the others wait briefly and reuse it), and dropped on a 401.

The token is stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under a key
derived from the client secret, so a Redis dump or replica holds no usable bearer
token. A fingerprint (a keyed hash) of the token sits beside the ciphertext so that
"drop this token, if it is still the cached one" is one atomic Lua script. The token's
lifetime is stored with it (inside the ciphertext), so that every process reading it
knows when a short-lived token is due for refresh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plural_cancel.errors import TokenUnavailable
from plural_cancel.worker.keys import Keys

log = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0
"""Seconds before expiry at which a cached token is replaced (less for a short-lived token)."""

LIFETIME_SHARE = 0.25
"""Share of a token's lifetime kept as its refresh margin when that is under REFRESH_MARGIN."""

LOCK_TTL_MS = 15_000
"""How long a refresh may hold the single-flight lock, in milliseconds (covers a slow token call)."""

WAIT_STEP = 0.05
"""Seconds between looks at Redis while another process fetches the token."""

@dataclass(frozen=True)
class AccessToken:
    """A bearer token from Generate Token; ``expires_at`` in epoch seconds. Its value never shows in ``repr``."""

    value: str = field(repr=False)
    expires_at: float


def refresh_margin(lifetime: float, margin: float = REFRESH_MARGIN) -> float:
    """Seconds before expiry to replace a token that lived ``lifetime`` seconds when fetched.

    ``margin`` (60 s) for ordinary tokens; a quarter of the life for one shorter than four
    margins, so that a 55-s token serves about 41 s of cancels between Generate Token calls
    instead of none. The margin only has to cover a request in flight and ordinary clock
    skew between this host and Plural (seconds for a token of any useful life); should a
    token still run out on the way, Plural's 401 costs one retry with a fresh token
    (``PluralClient._bearer``), not a failed cancel.
    """
    return min(margin, max(lifetime, 0.0) * LIFETIME_SHARE)


@dataclass(frozen=True)
class _Held:
    """A token and the time it is to be replaced at (epoch seconds)."""

    token: AccessToken
    refresh_at: float


class TokenStore(Protocol):
    """Where the client gets its bearer token from: :class:`MemoryTokenStore` or :class:`RedisTokenCache`."""

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        """A valid token, calling ``fetch()`` when none is cached or the cached one is about to expire."""

    def invalidate(self, token: str) -> None:
        """Drop ``token`` (Plural rejected it), only if it is still the cached one."""


class MemoryTokenStore:
    """An in-process :class:`TokenStore`: thread-safe, one fetch at a time, refreshed before expiry."""

    def __init__(self, clock: Callable[[], float] = time.time, refresh_margin: float = REFRESH_MARGIN):
        self._clock = clock
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self._token: AccessToken | None = None
        self._refresh_at = 0.0

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        # The lock is held across fetch() on purpose: threads that need a token at the
        # same moment wait for the one Generate Token call instead of each making one.
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token.value
            token = fetch()
            lifetime = token.expires_at - self._clock()
            self._refresh_at = token.expires_at - refresh_margin(lifetime, self._margin)
            self._token = token
            return token.value

    def invalidate(self, token: str) -> None:
        with self._lock:
            if self._token is not None and self._token.value == token:
                self._token = None


# KEYS: [1] token hash   ARGV: [1] fingerprint of the token to drop
# Deletes the cached token only when it is still the one that was rejected, so a
# 401 seen late never throws away a fresher token fetched by another process.
DROP_IF_SAME = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: [1] lock key   ARGV: [1] owner token
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""





class RedisTokenCache:
    """A :class:`TokenStore` backed by Redis, shared across processes and hosts."""

    def __init__(self, client: redis.Redis, client_id: str, client_secret: str, *,
                 keys: Keys = Keys(), clock: Callable[[], float] = time.time,
                 wait_timeout: float = 20.0):
        self._redis = client
        self._key = keys.token(client_id)
        self._lock_key = keys.token_lock(client_id)
        self._fernet, self._fp_key = _derive_keys(client_id, client_secret)
        self._clock = clock
        self._wait_timeout = wait_timeout
        self._drop = client.register_script(DROP_IF_SAME)
        self._release = client.register_script(RELEASE_LOCK)
        # A per-process memo saves a Redis round trip and a decryption per cancel;
        # it follows the same refresh deadline as the shared copy.
        self._local: _Held | None = None
        self._local_lock = threading.Lock()

    def get(self, fetch: Callable[[], AccessToken]) -> str:
        """A token with at least its refresh margin (:func:`refresh_margin`) left; calls ``fetch``
        in at most one process."""
        local = self._local
        if local is not None and self._fresh(local):
            return local.token.value
        with self._local_lock:  # one thread per process goes to Redis
            local = self._local
            if local is not None and self._fresh(local):
                return local.token.value
            held = self._get_shared(fetch)
            self._local = held
            return held.token.value

    def invalidate(self, token: str) -> None:
        """Drop ``token`` here and in Redis, unless a newer one has replaced it already."""
        with self._local_lock:
            if self._local is not None and self._local.token.value == token:
                self._local = None
        self._drop(keys=[self._key], args=[self._fingerprint(token)])
        log.info("plural token dropped after a 401")

    def _get_shared(self, fetch: Callable[[], AccessToken]) -> _Held:
        deadline = time.monotonic() + self._wait_timeout
        while True:
            cached = self._read()
            if cached is not None and self._fresh(cached):
                return cached
            owner = secrets.token_hex(8)
            if self._redis.set(self._lock_key, owner, nx=True, px=LOCK_TTL_MS):
                try:
                    # Another process may have stored a token between our read and the lock.
                    cached = self._read()
                    if cached is not None and self._fresh(cached):
                        return cached
                    return self._write(fetch())
                finally:
                    self._release(keys=[self._lock_key], args=[owner])
            if time.monotonic() >= deadline:
                raise TokenUnavailable("timed out waiting for another process to fetch the Plural token")
            time.sleep(WAIT_STEP)

    def _fresh(self, held: _Held) -> bool:
        return self._clock() < held.refresh_at

    def _read(self) -> _Held | None:
        blob = self._redis.hget(self._key, "blob")
        if blob is None:
            return None
        try:
            data = json.loads(self._fernet.decrypt(blob))
            token = AccessToken(value=data["t"], expires_at=float(data["exp"]))
            # "life": seconds the token had when fetched. A copy written before it was kept
            # has none and keeps the fixed margin.
            life = float(data["life"]) if "life" in data else float("inf")
        except (InvalidToken, ValueError, KeyError, TypeError):
            # Written under another secret (rotated credentials) or damaged: refetch.
            log.warning("cached plural token unreadable; fetching a new one")
            return None
        return _Held(token, token.expires_at - refresh_margin(life))

    def _write(self, token: AccessToken) -> _Held:
        """Share ``token`` until its refresh time (Redis expires the copy then); returns it held."""
        life = token.expires_at - self._clock()
        held = _Held(token, token.expires_at - refresh_margin(life))
        ttl_ms = int((held.refresh_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return held  # expired by this host's clock already: used once, not shared
        blob = self._fernet.encrypt(json.dumps({"t": token.value, "exp": token.expires_at, "life": life}).encode())
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._key, mapping={"blob": blob, "fp": self._fingerprint(token.value)})
        pipe.pexpire(self._key, ttl_ms)
        pipe.execute()
        return held

    def _fingerprint(self, token: str) -> str:
        return hmac.new(self._fp_key, token.encode(), hashlib.sha256).hexdigest()[:32]


def _derive_keys(client_id: str, client_secret: str) -> tuple[Fernet, bytes]:
    """A Fernet key and a fingerprint key, both derived from the client secret with HKDF."""
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"plural-cancel/token-cache/v1",
                    info=client_id.encode()).derive(client_secret.encode())
    return Fernet(base64.urlsafe_b64encode(material[:32])), material[32:]
