"""The worker's pool: Celery's threads pool, able to hand its cancels back on a cold shutdown.

Celery's soft/cold shutdown (SIGTERM with ``REMAP_SIGTERM=SIGQUIT``) waits
``worker_soft_shutdown_timeout``, then cancels every request still running by killing
its pool process (``terminate_job``), stops the pool, and closes the broker channel,
which makes kombu put every unacknowledged message back on its queue. The stock
threads pool cannot kill a job, so it raises ``NotImplementedError`` there and the
shutdown breaks; and it stops by waiting for every thread, so the messages stay
unacknowledged until the slowest cancel ends.

Written here because Celery offers nothing for it: a Python thread cannot be killed, so
this pool gives up on its running jobs instead. The channel then closes at once and the
messages go back to Redis; the threads left running finish their HTTP call (bounded by
the Plural timeouts) and record its answer before the process exits. The copy handed
back is harmless: the ledger skips it once the record is terminal, and holds it while
the first delivery still owns the link's lease (``worker.ledger``).
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool as ThreadTaskPool

log = logging.getLogger(__name__)


class TaskPool(ThreadTaskPool):
    """``celery.concurrency.thread.TaskPool`` whose jobs can be given up on, not killed."""

    given_up = False
    """Set once a cold shutdown has cancelled the running jobs: stop without waiting for them."""

    def terminate_job(self, pid, signal=None) -> None:
        # ``pid`` is this process for every thread: there is no one job to single out,
        # and a thread cannot be stopped from outside anyway. (A ``revoke --terminate``
        # lands here too: the cancel runs on, and the pool stops without waiting later.)
        if not self.given_up:
            log.info("pool: running cancels cannot be killed (threads); each finishes its call on its own")
        self.given_up = True

    def on_stop(self) -> None:
        # Jobs not started yet are dropped either way; their messages are unacknowledged
        # and go back to Redis with the others when the channel closes.
        self.executor.shutdown(wait=not self.given_up, cancel_futures=True)
