"""``python -m sandbox``: parse the options, call :func:`serve`.

The sandbox reads no environment: credentials come as ``--client-id`` /
``--client-secret`` (``plural-cancel sandbox`` fills them from the settings).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from plural_cancel.sandbox.api import TOKEN_STYLES
from plural_cancel.sandbox.faults import Faults
from plural_cancel.sandbox.server import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="A local Pine Labs Plural emulator with switchable faults.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=0, help="added before every /api answer")
    p.add_argument("--error-rate", type=float, default=0, help="probability of a 500 per call")
    p.add_argument("--outage", action="store_true", help="every /api call answers 503")
    p.add_argument("--reset-rate", type=float, default=0, help="probability of a TCP reset")
    p.add_argument("--timeout-rate", type=float, default=0,
                   help="probability of holding the answer --hang-ms")
    p.add_argument("--hang-ms", type=float, default=30000)
    p.add_argument("--token-ttl", type=float, default=3600, help="seconds new tokens live")
    p.add_argument("--token-style", choices=TOKEN_STYLES, default="expires_at")
    # No environment defaults: `plural-cancel sandbox` passes the settings' credentials;
    # `python -m sandbox` without them accepts any.
    p.add_argument("--client-id", default=None, help="the accepted client id (default: any)")
    p.add_argument("--client-secret", default=None, help="the accepted client secret (default: any)")
    p.add_argument("--seed", type=int, default=None, help="repeatable fault dice and ids")
    p.add_argument("--no-demo-links", action="store_true", help="start with no links")
    return p


def faults_from_options(*, latency_ms: float = 0, error_rate: float = 0, outage: bool = False,
                        reset_rate: float = 0, timeout_rate: float = 0, hang_ms: float = 30000,
                        token_ttl: float = 3600) -> dict[str, Any]:
    """The faults dict :func:`serve` takes, from the command-line options.

    ``error_rate`` is the probability of a 500; ``ValueError`` names a bad field.
    """
    faults: dict[str, Any] = {"latency_ms": latency_ms, "outage": outage,
                              "reset_rate": reset_rate, "timeout_rate": timeout_rate,
                              "hang_ms": hang_ms, "token_ttl": token_ttl}
    if error_rate:
        faults["error_rates"] = {"500": error_rate}
    Faults().updated(faults)  # raises ValueError naming the option's field
    return faults


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.client_id is None) != (args.client_secret is None):
        print("sandbox: give both --client-id and --client-secret, or neither", file=sys.stderr)
        return 2
    try:
        faults = faults_from_options(latency_ms=args.latency_ms, error_rate=args.error_rate,
                                     outage=args.outage, reset_rate=args.reset_rate,
                                     timeout_rate=args.timeout_rate, hang_ms=args.hang_ms,
                                     token_ttl=args.token_ttl)
    except ValueError as err:
        print(f"sandbox: {err}", file=sys.stderr)
        return 2
    try:
        serve(args.host, args.port, client_id=args.client_id, client_secret=args.client_secret,
              faults=faults, token_style=args.token_style, seed_demo=not args.no_demo_links,
              seed=args.seed)
    except OSError as err:
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    return 0
