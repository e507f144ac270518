"""The two identifiers every cancel carries, checked in one place before anything is written or sent."""

from __future__ import annotations

import re

_LINK_ID = re.compile(r"[A-Za-z0-9_-]{1,50}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,50}")


def validate_payment_link_id(value: object) -> str:
    """Return ``value`` if it is a Plural payment link id (1-50 of ``A-Za-z0-9_-``); else ValueError."""
    if not isinstance(value, str) or not _LINK_ID.fullmatch(value):
        raise ValueError(f"payment_link_id: must be 1-50 characters of A-Z a-z 0-9 _ - (got {_shown(value)})")
    return value


def validate_request_id(value: object) -> str:
    """Return ``value`` if it is a usable Request-ID (1-50 of ``A-Za-z0-9._:-``); else ValueError."""
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise ValueError(f"request_id: must be 1-50 characters of A-Z a-z 0-9 . _ : - (got {_shown(value)})")
    return value


def _shown(value: object) -> str:
    # Bad input is echoed (it helps the caller) but cut short and with control characters escaped.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
