"""Every Redis key this product uses, in one place.

All keys share one prefix so that an operator can find (and a test can scan) them all.
The Celery broker's own keys (the ``celery`` list, ``unacked``...) are kombu's and
live beside these in the same database.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "plural-cancel"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix; tests may use another prefix to stay apart."""

    prefix: str = PREFIX

    def record(self, request_id: str) -> str:
        """Hash: the status record of one cancel (the ledger)."""
        return f"{self.prefix}:req:{request_id}"

    def link_lock(self, payment_link_id: str) -> str:
        """String: who is cancelling this link right now (owner token, with a TTL)."""
        return f"{self.prefix}:link-lock:{payment_link_id}"

    @property
    def outbox(self) -> str:
        """Sorted set: request ids whose Celery message may not have left yet, scored by creation time."""
        return f"{self.prefix}:outbox"

    @property
    def leases(self) -> str:
        """Sorted set: request ids being worked on, scored by the time their lease runs out."""
        return f"{self.prefix}:leases"

    @property
    def deferred(self) -> str:
        """Sorted set: request ids waiting for a later attempt, scored by their due time."""
        return f"{self.prefix}:deferred"

    @property
    def failed(self) -> str:
        """Sorted set: request ids that ended ``failed`` (dead letters), scored by when."""
        return f"{self.prefix}:failed"

    @property
    def events(self) -> str:
        """Stream: one entry per terminal outcome, for downstream consumers."""
        return f"{self.prefix}:events"

    def token(self, client_id: str) -> str:
        """Hash: the encrypted Plural access token of one client id."""
        return f"{self.prefix}:token:{client_id}"

    def token_lock(self, client_id: str) -> str:
        """String: the single-flight lock for refreshing one client id's token."""
        return f"{self.prefix}:token-lock:{client_id}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key above."""
        return f"{self.prefix}:*"
