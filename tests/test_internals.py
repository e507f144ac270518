"""The Celery and kombu internals the product relies on, and the pins that hold them still.

``worker/broker.py`` and ``worker/pool.py`` override methods of kombu's Redis transport
and Celery's threads pool, and the batch publish (``worker/publisher.py``) builds messages
through kombu's Redis channel: none of it
is public API, so ``pyproject.toml`` pins Celery and kombu to one minor version each.
This is the first test an upgrade runs (docs/operations.md, "Upgrading Celery and kombu"): when an
internal moves or its parameters change, it fails naming the internal and the file that
uses it. What those files then do with them is tested by behaviour elsewhere
(``test_broker.py``, ``test_shutdown*``, ``test_schedule.py``'s byte-for-byte publish).
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import requires, version
from pathlib import Path

import kombu
import pytest
from celery.app.amqp import AMQP
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.utils.dispatch import Signal
from celery.utils.imports import symbol_by_name
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# (the file that relies on it, owner, method, the parameters it is called or overridden with,
# in order after ``self``; "**" a **kwargs, and keyword-only names it is given after "|")
METHODS = [
    ("worker/publisher.py", kombu_redis.Channel, "_q_for_pri", ["queue", "pri"]),
    ("worker/publisher.py", kombu_redis.Channel, "_inplace_augment_message", ["message", "exchange", "routing_key"]),
    ("worker/publisher.py", kombu_redis.Channel, "prepare_message",
     ["body", "priority", "content_type", "content_encoding", "headers", "properties"]),
    ("worker/publisher.py", kombu_redis.Channel, "conn_or_acquire", ["client"]),
    ("worker/publisher.py", AMQP, "as_task_v2", ["task_id", "name", "|", "kwargs", "ignore_result"]),
    ("worker/broker.py", kombu_redis.Channel, "_brpop_read", ["**"]),
    ("worker/broker.py", kombu_redis.Channel, "_get", ["queue"]),
    ("worker/broker.py", kombu_redis.Channel, "_create_client", ["asynchronous"]),
    ("worker/broker.py", kombu_redis.Channel, "_get_pool", ["asynchronous"]),
    ("worker/broker.py", kombu_redis.Channel, "decode_body", ["body", "encoding"]),
    ("worker/broker.py", kombu_redis.QoS, "ack", ["delivery_tag"]),
    ("worker/broker.py", kombu_redis.QoS, "reject", ["delivery_tag", "requeue"]),
    ("worker/broker.py", kombu_virtual.QoS, "ack", ["delivery_tag"]),
    ("worker/broker.py", kombu_redis.Transport, "_deliver", ["message", "queue"]),
    ("worker/pool.py", ThreadTaskPool, "terminate_job", ["pid", "signal"]),
    ("worker/pool.py", ThreadTaskPool, "on_stop", []),
]

# (the file that relies on it, owner, class attribute)
ATTRIBUTES = [
    ("worker/broker.py", kombu_redis.Channel, "unacked_key"),
    ("worker/broker.py", kombu_redis.Channel, "unacked_index_key"),
    ("worker/broker.py", kombu_redis.Channel, "unacked_mutex_key"),
    ("worker/broker.py", kombu_redis.Channel, "QoS"),
    ("worker/broker.py", kombu_redis.Channel, "codecs"),
    ("worker/broker.py", kombu_redis.Channel, "active_queues"),
    ("worker/broker.py", kombu_redis.Channel, "pool"),
    ("worker/broker.py", kombu_redis.Transport, "Channel"),
    ("worker/broker.py", kombu_redis, "SentinelChannel"),
    ("worker/broker.py", kombu_redis.SentinelTransport, "default_port"),
]


def _name(owner) -> str:
    return owner.__name__ if inspect.ismodule(owner) else f"{owner.__module__}.{owner.__qualname__}"


def _moved(what: str, where: str, detail: str) -> str:
    return (f"{what} (relied on by {where}) {detail} in celery {version('celery')} / kombu {version('kombu')}: "
            f"read {where} against the new version before moving the pins in pyproject.toml")


@pytest.mark.parametrize("where, owner, method, params", METHODS,
                         ids=[f"{m[1].__name__}.{m[2]}" for m in METHODS])
def test_each_method_relied_on_is_there_with_its_parameters(where, owner, method, params):
    what = f"{_name(owner)}.{method}"
    assert callable(getattr(owner, method, None)), _moved(what, where, "is gone")
    signature = inspect.signature(getattr(owner, method))
    names = [p for p in signature.parameters if p != "self"]
    positional, keywords = params, []
    if "|" in params:
        cut = params.index("|")
        positional, keywords = params[:cut], params[cut + 1:]
    if positional == ["**"]:
        kinds = [p.kind for p in signature.parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD in kinds, _moved(what, where, f"no longer takes **options {signature}")
        return
    assert names[:len(positional)] == positional, \
        _moved(what, where, f"takes {signature}, not ({', '.join(positional)})")
    for keyword in keywords:
        assert keyword in names, _moved(what, where, f"no longer takes {keyword}= {signature}")


@pytest.mark.parametrize("where, owner, attribute", ATTRIBUTES, ids=[f"{a[1].__name__}.{a[2]}" for a in ATTRIBUTES])
def test_each_class_attribute_relied_on_is_there(where, owner, attribute):
    assert hasattr(owner, attribute), _moved(f"{_name(owner)}.{attribute}", where, "is gone")


def test_the_instance_internals_are_there():
    pool = ThreadTaskPool(limit=1)
    executor = getattr(pool, "executor", None)
    try:
        assert executor is not None, \
            _moved("celery.concurrency.thread.TaskPool().executor", "worker/pool.py", "is gone")
        assert "cancel_futures" in inspect.signature(executor.shutdown).parameters, \
            _moved("TaskPool().executor.shutdown(cancel_futures=)", "worker/pool.py", "changed")
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    assert "providing_args" in inspect.signature(Signal).parameters, \
        _moved("celery.utils.dispatch.Signal(providing_args=)", "worker/broker.py", "changed")


@pytest.mark.parametrize("where, step", [("worker/app.py", "celery.worker.components:Timer"),
                                         ("worker/health.py", "celery.worker.consumer.tasks:Tasks")])
def test_the_bootsteps_ours_require_still_exist(where, step):
    try:
        symbol_by_name(step)
    except (ImportError, AttributeError):
        pytest.fail(_moved(f"the bootstep {step}", where, "is gone"))


def test_a_real_channel_has_what_the_broker_reads_from_it(redis_url):
    """``worker/broker.py`` reads the channel's connection, pool and queues (``_get_pool``, ``_create_client``)."""
    from plural_cancel.worker.broker import QoS, Transport

    with kombu.Connection(redis_url, transport=Transport) as connection:
        channel = connection.channel()
        try:
            assert channel.connection.client is connection, \
                _moved("Channel.connection.client", "worker/broker.py", "is not the kombu Connection")
            assert channel.pool.connection_kwargs, _moved("Channel.pool", "worker/broker.py", "is not a redis pool")
            assert isinstance(channel.active_queues, (list, set)), \
                _moved("Channel.active_queues", "worker/broker.py", "changed")
            assert isinstance(channel.qos, QoS), _moved("Channel.QoS", "worker/broker.py", "is no longer used")
            # kombu's _put and the batch publish take their client here: ours hands out one per channel.
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second, _moved("Channel._create_client", "worker/broker.py",
                                               "is no longer how Channel.conn_or_acquire gets its client")
        finally:
            channel.close()


# -- the pins ---------------------------------------------------------------------------

def _our(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in dependencies if Requirement(d).name == name]
    assert found, f"pyproject.toml does not name {name} in [project] dependencies"
    return found[0]


def _bounds(requirement: Requirement) -> tuple[Version | None, Version | None]:
    """The ``>=`` floor and ``<`` ceiling of a requirement (None where it has none)."""
    ops = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    return ops.get(">="), ops.get("<")


@pytest.mark.parametrize("name", ["celery", "kombu", "redis"])
def test_the_installed_versions_are_within_the_pins(name):
    pin = _our(name)
    assert pin.specifier.contains(version(name)), \
        f"{name} {version(name)} is installed but pyproject.toml pins {pin}: run `make setup` (or bump the pin: " \
        "docs/operations.md)"


@pytest.mark.parametrize("name", ["celery", "kombu"])
def test_celery_and_kombu_are_pinned_to_one_minor_version(name):
    floor, ceiling = _bounds(_our(name))
    assert floor is not None and ceiling is not None, f"pyproject.toml: {name} needs both >= and <"
    assert (ceiling.major, ceiling.minor) == (floor.major, floor.minor + 1) and ceiling.micro == 0, \
        f"pyproject.toml pins {_our(name)}: one minor version (>=X.Y,<X.Y+1), whose internals this test checks"


def test_our_redis_range_lies_within_kombus_own():
    [kombus] = [Requirement(r.split(";")[0]) for r in requires("kombu") or []
                if r.startswith("redis") and 'extra == "redis"' in r]
    ours = _our("redis")
    (our_floor, our_ceiling), (their_floor, their_ceiling) = _bounds(ours), _bounds(kombus)
    assert our_floor is not None and (their_floor is None or our_floor >= their_floor), \
        f"pyproject.toml asks for {ours}, below kombu {version('kombu')}'s own floor ({kombus})"
    assert our_ceiling is not None and (their_ceiling is None or our_ceiling <= their_ceiling), \
        f"pyproject.toml asks for {ours}, above kombu {version('kombu')}'s own ceiling ({kombus})"
