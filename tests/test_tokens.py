"""The token cache shared through Redis: one token call for many processes, encrypted at rest."""

from __future__ import annotations

import multiprocessing
import time

import redis

from plural_cancel.worker.keys import Keys
from plural_cancel.worker.plural import PluralClient
from plural_cancel.worker.tokens import REFRESH_MARGIN, AccessToken, MemoryTokenStore, RedisTokenCache

SECRET = "test-secret-do-not-leak"


def _get_token(redis_url: str, plural_url: str, barrier) -> str:
    client_redis = redis.Redis.from_url(redis_url)
    cache = RedisTokenCache(client_redis, "test-client", SECRET)
    client = PluralClient(plural_url, "test-client", SECRET, tokens=cache)
    barrier.wait()
    return cache.get(client.generate_token)


def test_eight_processes_at_once_cause_one_token_request(redis_url, sandbox_process):
    sandbox_process.clear_requests()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(8)
    sandbox_process.set_faults(latency_ms=300)  # a slow token call makes the race real
    try:
        with ctx.Pool(8) as pool:
            tokens = pool.starmap(_get_token, [(redis_url, sandbox_process.url, barrier)] * 8)
    finally:
        sandbox_process.set_faults(latency_ms=0)
    assert len(set(tokens)) == 1
    token_calls = [r for r in sandbox_process.requests() if r["path"].endswith("/auth/v1/token")]
    assert len(token_calls) == 1


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_token_is_encrypted_in_redis_and_refreshed_before_expiry(redis_client):
    clock = FakeClock(1_000_000.0)
    calls = []

    def fetch():
        calls.append(1)
        return AccessToken(value=f"bearer-token-{len(calls)}", expires_at=clock.now + 3600)

    cache = RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock)
    assert cache.get(fetch) == "bearer-token-1"
    stored = redis_client.hgetall(Keys().token("cid"))
    assert b"bearer-token" not in b"".join(stored.values())
    assert SECRET.encode() not in b"".join(stored.values())
    assert 3600 - REFRESH_MARGIN - 2 <= redis_client.ttl(Keys().token("cid")) <= 3600 - REFRESH_MARGIN

    other_process = RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock)
    assert other_process.get(fetch) == "bearer-token-1" and len(calls) == 1

    clock.now += 3600 - REFRESH_MARGIN + 1  # inside the refresh margin: a new token
    redis_client.delete(Keys().token("cid"))  # as Redis's TTL would have done
    assert other_process.get(fetch) == "bearer-token-2"
    assert cache.get(fetch) == "bearer-token-2" and len(calls) == 2


def test_a_rejected_token_is_dropped_only_if_still_cached(redis_client):
    clock = FakeClock(time.time())
    n = iter(range(1, 100))
    fetch = lambda: AccessToken(value=f"tok-{next(n)}", expires_at=clock.now + 3600)  # noqa: E731
    a = RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock)
    b = RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock)
    assert a.get(fetch) == "tok-1" and b.get(fetch) == "tok-1"
    a.invalidate("tok-1")
    assert a.get(fetch) == "tok-2"
    b.invalidate("tok-1")  # b saw a 401 with the old token late: tok-2 must survive in Redis
    assert b.get(fetch) == "tok-2"


def test_a_token_written_under_another_secret_is_refetched(redis_client):
    clock = FakeClock(time.time())
    old = RedisTokenCache(redis_client, "cid", "old-secret", clock=clock, monotonic=clock)
    old.get(lambda: AccessToken(value="old-token", expires_at=clock.now + 3600))
    rotated = RedisTokenCache(redis_client, "cid", "new-secret", clock=clock, monotonic=clock)
    assert rotated.get(lambda: AccessToken(value="new-token", expires_at=clock.now + 3600)) == "new-token"


# -- short-lived tokens: the refresh margin scales with the token's life (issue #11 item 7) --

def token_calls(sandbox) -> list[dict]:
    return [r for r in sandbox.requests() if r["path"].endswith("/auth/v1/token")]


def test_a_55_second_token_serves_many_cancels_through_the_redis_cache(redis_client, redis_url, sandbox_process):
    sandbox = sandbox_process
    sandbox.reset_faults()
    links = sandbox.create_links(20, prefix="pl-tok55-")
    sandbox.clear_requests()
    sandbox.set_faults(token_ttl=55)
    try:
        cache = RedisTokenCache(redis_client, "test-client", SECRET)
        with PluralClient(sandbox.url, "test-client", SECRET, tokens=cache) as client:
            for n, link in enumerate(links[:10]):
                assert client.cancel_payment_link(link, f"tok55-{n}").status == "CANCELLED"
        # Another process: it finds the token in Redis, with the life it was issued for.
        other = RedisTokenCache(redis.Redis.from_url(redis_url), "test-client", SECRET)
        with PluralClient(sandbox.url, "test-client", SECRET, tokens=other) as client:
            for n, link in enumerate(links[10:], start=10):
                assert client.cancel_payment_link(link, f"tok55-{n}").status == "CANCELLED"
    finally:
        sandbox.reset_faults()
    assert len(token_calls(sandbox)) == 1
    assert [r["status"] for r in sandbox.requests() if r["method"] == "PUT"] == [200] * 20


def test_a_2_second_token_is_used_then_refreshed_after_a_quarter_of_its_life(redis_client, sandbox_process):
    sandbox = sandbox_process
    sandbox.reset_faults()
    [link] = sandbox.create_links(1, prefix="pl-tok2-")
    sandbox.clear_requests()
    sandbox.set_faults(token_ttl=2)
    try:
        cache = RedisTokenCache(redis_client, "test-client", SECRET)
        with PluralClient(sandbox.url, "test-client", SECRET, tokens=cache) as client:
            # Issued after ``start``: due for refresh 1.5 s after it (2 s less a quarter), or a
            # little later by the time its answer took (the life is counted on arrival).
            start, calls = time.time(), 0
            while time.time() < start + 1.0 or calls < 3:
                client.get_payment_link(link)
                calls += 1
            [issued] = token_calls(sandbox)
            assert calls > 3, calls
            time.sleep(max(0.0, issued["timestamp"] + 1.75 - time.time()))  # due, not yet expired
            client.get_payment_link(link)
    finally:
        sandbox.reset_faults()
    assert len(token_calls(sandbox)) == 2
    assert {r["status"] for r in sandbox.requests()} == {200}  # refreshed before Plural refused it


def test_the_refresh_time_is_kept_beside_the_token_so_every_process_refreshes_alike(redis_client):
    clock = FakeClock(1_000_000.0)
    calls = []

    def fetch():
        calls.append(1)
        return AccessToken(value=f"short-{len(calls)}", expires_at=clock.now + 55)

    assert RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock).get(fetch) == "short-1"
    # Shared until a quarter of its life is left: 41.25 s of its 55.
    assert 41_000 <= redis_client.pttl(Keys().token("cid")) <= 41_250
    clock.now += 41
    assert RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock).get(fetch) == "short-1"
    clock.now += 0.5  # 13.5 s left: a fresh process (its Redis copy read anew) fetches
    assert RedisTokenCache(redis_client, "cid", SECRET, clock=clock, monotonic=clock).get(fetch) == "short-2"
    assert len(calls) == 2


def test_the_memory_store_follows_the_same_margin():
    clock = FakeClock(1_000_000.0)
    store, n = MemoryTokenStore(clock=clock), iter(range(1, 10))
    fetch = lambda: AccessToken(value=f"mem-{next(n)}", expires_at=clock.now + 55)  # noqa: E731
    assert store.get(fetch) == "mem-1"
    clock.now += 41
    assert store.get(fetch) == "mem-1"
    clock.now += 0.5
    assert store.get(fetch) == "mem-2"


# -- a host whose clock is off: the token's life is judged on Redis's clock --------------------

def test_a_worker_an_hour_ahead_keeps_its_token_and_says_its_clock_is_off(redis_url, sandbox_process, services):
    """One worker whose host clock runs an hour ahead, 1-hour tokens: judged by
    that clock every token is expired on arrival, and each cancel fetched one (32 token calls
    for 60 cancels). Judged by Redis's, one serves them all; the worker says its clock is off."""
    from plural_cancel.tasks import enqueue_many
    from plural_cancel.tasks.producer import get_statuses
    from tests.conftest import use_settings, wait_for
    from tests.support.workers import service_env, skewed_clock, start_worker

    sandbox = sandbox_process
    sandbox.reset_faults()
    links = sandbox.create_links(60, prefix="pl-skew-")
    sandbox.clear_requests()
    env = service_env(redis_url, sandbox.url, PLURAL_RATE_LIMIT=50, **skewed_clock(3600))
    worker = start_worker(env, concurrency=8)
    services.append(worker)
    app = use_settings(redis_url, sandbox.url)
    request_ids = enqueue_many(links, app=app)
    wait_for(lambda: all(s and s["state"] == "succeeded" for s in get_statuses(request_ids, app=app)), 60, 0.2,
             message="60 cancels succeeded")
    assert len(token_calls(sandbox)) == 1
    assert "plural token has" not in worker.log()
    assert "this host's clock is +3600" in worker.log()
