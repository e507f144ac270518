"""Every Redis key this product uses, in one place.

All keys share one prefix so that an operator can find (and a test can scan) them all.
The Celery broker's own keys are kombu's and live beside these in the same database:
the queue list (``CANCEL_QUEUE``, ``plural-cancel`` by default) and the
``_kombu.binding.*`` sets; kombu's bookkeeping of unacknowledged messages is ours
(:attr:`Keys.unacked`, used by ``worker.broker``), apart from a host app's ``unacked`` hash.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "plural-cancel"

DEFAULT_ACCOUNT = "default"
"""The account of a cancel that names none (``PLURAL_CLIENT_ID``'s, as before accounts)."""


def account_arg(account: str) -> str:
    """An account as the ledger's scripts take it and records store it: '' for
    :data:`DEFAULT_ACCOUNT` (a single-account fleet's records and keys stay as they were)."""
    return "" if account == DEFAULT_ACCOUNT else account


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix; tests may use another prefix to stay apart."""

    prefix: str = PREFIX

    def record(self, request_id: str) -> str:
        """Hash: the status record of one cancel (the ledger)."""
        return f"{self.prefix}:req:{request_id}"

    def link(self, payment_link_id: str, account: str = DEFAULT_ACCOUNT) -> str:
        """String: the Request-ID of this (account, link)'s live cancel, the one Plural sees (no
        TTL: removed when that cancel ends). ``link:<link>`` for the default account,
        ``link:<account>:<link>`` for another (a link id has no ``:``); ``link("")`` is the
        prefix the scripts extend (``link_key`` in ``worker.ledger_lua``)."""
        if account == DEFAULT_ACCOUNT or not payment_link_id:
            return f"{self.prefix}:link:{payment_link_id}"
        return f"{self.prefix}:link:{account}:{payment_link_id}"

    def followers(self, request_id: str) -> str:
        """Set: Request-IDs of later cancels of the same link that end with this one."""
        return f"{self.prefix}:followers:{request_id}"

    @property
    def due(self) -> str:
        """Sorted set: every live cancel that leads its link, scored by when it next needs
        attention (epoch seconds, Redis's clock): its retry time when deferred, its lease's
        end when running, the time its message should have been taken by when queued."""
        return f"{self.prefix}:due"

    @property
    def backlog(self) -> str:
        """List: Request-IDs of bulk cancels waiting their turn (``queued``, in no other index),
        pushed at the head when enqueued, taken from the tail by the pump when the fleet has
        room for them; they then enter ``due`` like any published cancel."""
        return f"{self.prefix}:backlog"

    @property
    def live(self) -> str:
        """Sorted set: Request-IDs of the live cancels (queued, running, retrying) that are not
        held in a backlog, scored by their record's ``created_at`` (epoch seconds, Redis's
        clock): with the backlogs, which are in creation order, where the age of the oldest live
        cancel is read (``OLDEST_LIVE`` in ``worker.ledger_lua``). Held cancels stay out of it:
        an entry costs a backlogged cancel more than a third of its bytes again."""
        return f"{self.prefix}:live"

    def account_key(self, account: str, what: str) -> str:
        """One of an account's own keys: ``what`` is ``ratelimit``, ``breaker`` (each with the
        keys beside it), ``token``, ``token-lock``, ``backlog``, ``live`` or ``stats``.

        Another account's are ``acct:<name>:<what>``, but for three the ledger's scripts
        derive from the shared key they are given: ``backlog:<name>`` (List: as
        :attr:`backlog`, its held cancels), ``live:<name>`` (Sorted set: as :attr:`live`) and
        ``stats:<name>`` (Hash: as :attr:`stats`, for its cancels alone). The default account
        keeps the keys it had before accounts (:attr:`ratelimit`, :attr:`breaker`,
        :meth:`token`, :attr:`backlog`, :attr:`live`) and counts its cancels in ``stats:default``."""
        if what == "stats":
            return f"{self.stats}:{account}"
        if account == DEFAULT_ACCOUNT:
            return {"ratelimit": self.ratelimit, "breaker": self.breaker, "backlog": self.backlog,
                    "live": self.live}[what]
        if what in ("backlog", "live"):
            return f"{getattr(self, what)}:{account}"
        return f"{self.prefix}:acct:{account}:{what}"

    @property
    def accounts(self) -> str:
        """Hash: account name -> its rate limit (calls per second), every account the workers
        know, written by them whole at each reload of the accounts file (never a secret):
        producers check a name here, and the pump reads each account's rate."""
        return f"{self.prefix}:accounts"

    @property
    def backlogs(self) -> str:
        """Set: names of the accounts whose backlog (:meth:`account_key` ``backlog``) may hold
        cancels; the pump takes each one's turn and drops an account once its backlog is empty."""
        return f"{self.prefix}:backlogs"

    @property
    def failed(self) -> str:
        """Sorted set: request ids that ended ``failed`` (dead letters), scored by when."""
        return f"{self.prefix}:failed"

    @property
    def events(self) -> str:
        """Stream: one entry per terminal outcome, for downstream consumers."""
        return f"{self.prefix}:events"

    @property
    def callbacks(self) -> str:
        """Sorted set: Request-IDs of ended cancels whose callback (a producer's Celery task)
        is still to be sent, scored by when it is due (epoch seconds, Redis's clock): its end,
        then the end of the lease of the worker sending it."""
        return f"{self.prefix}:callbacks"

    def token(self, client_id: str) -> str:
        """Hash: the encrypted Plural access token of one client id."""
        return f"{self.prefix}:token:{client_id}"

    def token_lock(self, client_id: str) -> str:
        """String: the single-flight lock for refreshing one client id's token."""
        return f"{self.prefix}:token-lock:{client_id}"

    @property
    def ratelimit(self) -> str:
        """String: the limiter's theoretical arrival time (GCRA); ``:pace`` beside it is a hash of
        the fleet's pace (``worker.pace``: its weighted calls and throttles, its last cut, and
        ``a:<second>`` fields counting the calls Plural accepted in each recent second)."""
        return f"{self.prefix}:ratelimit"

    @property
    def breaker(self) -> str:
        """Hash: the circuit breaker's state. Beside it: ``:probe``, the one-probe-at-a-time lock
        (a string with a TTL); ``:called`` and ``:failing``, sorted sets of the window's links
        scored by the time of their latest outcome (``worker.breaker``)."""
        return f"{self.prefix}:breaker"

    @property
    def schedule(self) -> str:
        """Sorted set: payment link ids with a cancel scheduled for later, scored by its due time (epoch seconds)."""
        return f"{self.prefix}:schedule"

    def scheduled(self, payment_link_id: str) -> str:
        """Hash: one link's scheduled cancel (``request_id``, ``at``, its callback if any)."""
        return f"{self.prefix}:schedule:link:{payment_link_id}"

    @property
    def schedule_ids(self) -> str:
        """Hash: Request-ID -> payment link id of every scheduled cancel (one Request-ID, one link)."""
        return f"{self.prefix}:schedule:ids"

    def schedule_fired(self, payment_link_id: str) -> str:
        """Hash: the last scheduled cancel of this link that fired (``request_id``, ``at``, ``fired_at``,
        ``result``), kept RESULT_TTL seconds."""
        return f"{self.prefix}:schedule:fired:{payment_link_id}"

    @property
    def stats(self) -> str:
        """Hash: how many records are ``queued``, ``running`` and ``retrying`` right now, and
        how many wait for a due time (``deferred``), kept by the ledger's scripts on every
        state change (``plural-cancel stats``)."""
        return f"{self.prefix}:stats"

    @property
    def malformed(self) -> str:
        """Hash: reason -> messages that reached a worker malformed and were dropped without a
        record to fail (``worker.malformed``), counted by every worker since the key was made."""
        return f"{self.prefix}:malformed"

    @property
    def unreplicated(self) -> str:
        """Hash: ``writes`` -> producer writes that went through with no replica connected to
        the master (``REDIS_WAIT_REPLICAS=auto``, ``worker.replication``)."""
        return f"{self.prefix}:unreplicated"

    @property
    def unreplicated_warned(self) -> str:
        """String (60-s TTL): a producer warned, fleet-wide, that writes have no replica
        (``worker.replication``): the others keep quiet until it expires."""
        return f"{self.prefix}:unreplicated-warned"

    @property
    def replication_mark(self) -> str:
        """String (60-s TTL): a write made only to ``WAIT`` for, when a replica that connected
        during a producer's write must be shown to hold it (``worker.replication``)."""
        return f"{self.prefix}:replication-mark"

    def finished(self, bucket: int | str) -> str:
        """Hash: outcome -> records that reached it in the hour starting at ``bucket``
        (epoch seconds); it expires with the records it counts. ``finished("")`` is the prefix."""
        return f"{self.prefix}:finished:{bucket}"

    @property
    def unacked(self) -> str:
        """Hash: delivery tag -> message our workers hold unacknowledged (kombu's Redis
        ``unacked_key``). Beside it: ``_index`` (sorted set: delivery tag by delivery time,
        which kombu's restore sweeps past the visibility timeout) and ``_mutex`` (the sweep's
        lock). Ours, not kombu's default ``unacked``, which every other Celery app on the
        database shares: a sweep then restores only our own messages, on our own
        visibility timeout (``config.celery``)."""
        return f"{self.prefix}:unacked"

    def pattern(self) -> str:
        """A SCAN pattern matching every key above."""
        return f"{self.prefix}:*"
