"""Sandbox: a local Pine Labs Plural, because the real one cannot be reached from here.

It serves Plural's own paths under ``http://HOST:PORT/api`` with the seed's shapes,
and switchable faults under ``/_admin``. It imports nothing from ``worker``, ``tasks``
or ``config``: clients talk to it over HTTP only. Its server is aiohttp's (the
``sandbox`` extra, :mod:`sandbox.server`); its command line is one click command,
``plural-cancel sandbox`` or, inside the repository, ``python -m sandbox``
(:mod:`sandbox.cli`).

Paths (all need ``Authorization: Bearer <token>`` and ``Request-ID`` except the token call)::

    POST /api/auth/v1/token                    -> {"access_token", "expires_at"} (or "expires_in")
    POST /api/pay/v1/paymentlink               -> the new link, status CREATED
    GET  /api/pay/v1/paymentlink/{id}          -> the link
    PUT  /api/pay/v1/paymentlink/{id}/cancel   -> the link, status CANCELLED, cancelled_at set

Which 4xx comes back when (Plural documents only 200 and 500 for cancel; these are the
sandbox's choices, checked in this order)::

    400 INVALID_REQUEST             token call: body not JSON, a field missing, grant_type
                                    not client_credentials
    422 USER_AUTHENTICATION_FAILED  token call: client_id/client_secret match none of the
                                    accounts (any pair is accepted when none is set)
    401 UNAUTHORIZED                no bearer token, one this sandbox did not issue, expired,
                                    revoked (POST /_admin/revoke-tokens), or reject_tokens
    400 INVALID_REQUEST             Request-ID missing or not 1-50 chars; Request-Timestamp
                                    present but not ISO 8601; link id not 1-50 chars of
                                    A-Za-z0-9_-; create body invalid (message names the field)
    404 NOT_FOUND                   unknown link id (get or cancel)
    400 INVALID_REQUEST             cancel of a link in CANCELLED, PROCESSED,
                                    PARTIAL_PROCESSED, EXPIRED or PAYMENT_INITIATED:
                                    "payment link is in status X and cannot be cancelled"
    405 METHOD_NOT_ALLOWED          a known path with the wrong method (``Allow`` header)
    429 RATE_LIMITED                only as a fault, with ``Retry-After: <seconds>``: a cancel
                                    past the account's ``limit_rps`` (the seconds to its next
                                    free slot), ``throttle_rate``, or ``error_rates`` {"429": p}
    400 PAYMENT_RATE_LIMIT          only as a fault (``plural_throttle_rate``, cancels): a
                                    throttle in Plural's own words, no ``Retry-After``

Error bodies are ``{"code", "message"}``; the details object Plural names two ways is
used as follows, both carrying ``source`` and ``step``:

- ``additional_error_details``: 400 on cancel of a non-cancellable link
  (``{"source": "PAYMENT_LINK", "step": "CANCEL"}``) and 400 on an invalid create body
  (step ``CREATE``);
- ``additionalErrorPayload``: 404 ``NOT_FOUND`` (source ``PAYMENT_LINK``, step ``GET`` or
  ``CANCEL``) and injected 500/503 ``INTERNAL_ERROR`` (source ``OMS``, as in the seed);
- neither: 401, 422, 429, 405, ``PAYMENT_RATE_LIMIT`` and header/id 400s.

Faults (``PUT /_admin/faults``, see :class:`sandbox.faults.Faults`) apply to /api only
(and spare the token call when ``faults_skip_token``): an outage answers 503
``INTERNAL_ERROR``; 502/504 come as a proxy's HTML page; ``link_errors`` makes one link
fail with a status on every call (a "poison" link); an injected status or a reset
(TCP RST, no answer) means the call was *not* processed. The throttles answer cancels
only (the calls a client paces): ``limit_rps`` counts each account's admitted cancels in a
sliding window (:mod:`sandbox.limit`), ``throttle_rate`` and ``plural_throttle_rate`` are
random; the request log's ``fault`` says which one answered (``limit``, ``throttle``,
``plural_throttle``). Latency and timeouts hold the
answer *after* processing: the call is logged and applied on arrival, so a client that
gives up, or dies, while waiting has still cancelled the link.

Faults are global (every account's) unless an account sets its own: ``PUT
/_admin/accounts/{client_id}/faults`` overrides any fields for that account's calls (those
made with its tokens, and its Generate Token calls), a field set to null follows the
global one again, and ``DELETE`` drops them all; ``limit_rps`` always counts per account.

Admin (no auth, no faults)::

    GET    /_admin/health                  GET  /_admin/stats
    GET    /_admin/requests?since=SEQ      DELETE /_admin/requests
    GET|PUT|DELETE /_admin/faults          (DELETE: back to the start-up faults, for every
                                           account, and no limit counts)
    GET    /_admin/accounts                (client ids, and each one's own faults)
    GET|PUT|DELETE /_admin/accounts/{client_id}/faults   (GET, PUT answer those in force)
    POST   /_admin/revoke-tokens           GET  /_admin/tokens (every token issued)
    POST   /_admin/links {"count", "status", "prefix"} or {"id", "status"} -> {"ids"}
    GET|PUT /_admin/links/{id}             (the link + cancel_count, cancel_attempts)
    POST   /_admin/reset                   (demo links only, empty log, no tokens)

Accounts: ``--client-id``/``--client-secret`` and every ``--account CLIENT_ID:SECRET`` are
Plural merchant accounts; each token belongs to the account that obtained it (with no
account set, to the client id it was asked for), and the request log names each call's
account (its client id; never a secret or a token).

A cancelled link's object carries every key of the seed's example, its misspelt
``adddress_type`` included; other links omit ``cancelled_at``. Demo links, one per
status and five CREATED, are listed in :data:`sandbox.state.DEMO_LINKS`; their
customers' personal data is :data:`sandbox.links.DEMO_PERSONAL_DATA`.
"""

if __name__ == "sandbox":
    import sys

    # The short name (`python -m sandbox`, from the repository root): the namespaced package's
    # names, and no submodules of its own, so nothing loads twice: `import sandbox.server`
    # fails instead. But for `python -m sandbox` itself, which must find `__main__.py` here
    # (sys.argv[0] is "-m" while -m locates its module, and only then: documented);
    # `__main__.py` imports the namespaced package alone.
    if sys.argv[:1] != ["-m"]:
        __path__ = []

# After the short name's guard (E402).
from plural_cancel.sandbox.cli import main  # noqa: E402
from plural_cancel.sandbox.links import DEMO_PERSONAL_DATA, STATUSES  # noqa: E402
from plural_cancel.sandbox.state import DEMO_LINKS  # noqa: E402


def __getattr__(name: str):
    # The server needs aiohttp (the ``sandbox`` extra), which every ``plural-cancel``
    # command would otherwise import, through the ``sandbox`` command, for nothing.
    if name in ("Sandbox", "SandboxServer", "serve"):
        from plural_cancel.sandbox import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEMO_LINKS", "DEMO_PERSONAL_DATA", "STATUSES", "Sandbox", "SandboxServer", "main", "serve"]
