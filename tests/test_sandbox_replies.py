"""The sandbox's answers as bytes: the same JSON whichever encoder wrote it, timestamps to the millisecond."""

from __future__ import annotations

import json
import random
import sys

from plural_cancel.sandbox import replies
from plural_cancel.sandbox.links import iso_ms, sample_link


def _stdlib(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _link() -> dict:
    link = sample_link("pl-replies-01", 3, "CANCELLED", 1_764_547_200.25, random.Random(7))
    link["customer"]["first_name"] = "Zoë ₹ 名前"  # non-ASCII goes out as UTF-8, never \u escapes
    link["amount"]["value"] = 150_050
    return link


def test_a_reply_is_the_standard_librarys_compact_utf8_json():
    """orjson (the sandbox extra) writes what ``json.dumps`` writes, byte for byte."""
    link = _link()
    body = replies.json_reply(200, link).body
    assert body == _stdlib(link)
    assert "Zoë ₹ 名前".encode() in body


def test_without_orjson_the_standard_library_writes_the_same_bytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson now raises ImportError
    encode = replies._encoder()
    link = _link()
    assert encode(link) == _stdlib(link)
    assert encode({"code": "NOT_FOUND", "message": "payment link pl-x not found"}) == \
        b'{"code":"NOT_FOUND","message":"payment link pl-x not found"}'


def test_iso_ms_rounds_to_the_millisecond_across_a_second():
    assert iso_ms(1_764_547_199.9994) == "2025-11-30T23:59:59.999Z"
    assert iso_ms(1_764_547_199.9996) == "2025-12-01T00:00:00.000Z"
    assert iso_ms(1_764_547_200.0) == "2025-12-01T00:00:00.000Z"
    assert iso_ms(0.0015) == "1970-01-01T00:00:00.002Z"
