"""The Lua scripts as composed (``worker.lua``): each function defined once in a script,
and each script's sections cut by lengths its caller passes, never by fixed slices."""

from __future__ import annotations

import re

import pytest

from plural_cancel.worker import attempts, breaker, ledger_lua, schedule, tokens
from plural_cancel.worker.lua import Lua, script

SCRIPTS = {
    "ADMIT": attempts.ADMIT, "SETTLE": attempts.SETTLE, "CREATE_MANY": ledger_lua.CREATE_MANY,
    "REJECT": ledger_lua.REJECT, "PUMP": ledger_lua.PUMP, "REQUEUE": ledger_lua.REQUEUE,
    "TAKE_CALLBACKS": ledger_lua.TAKE_CALLBACKS, "CALLBACKS_SENT": ledger_lua.CALLBACKS_SENT,
    "STATE": breaker.STATE, "FIRE": schedule.FIRE, "SCHEDULE": schedule.SCHEDULE,
    "UNSCHEDULE": schedule.UNSCHEDULE, "DROP_IF_SAME": tokens.DROP_IF_SAME, "RELEASE_LOCK": tokens.RELEASE_LOCK,
}


def test_script_puts_each_part_once_needs_first():
    base = Lua("local function base() end")
    a = Lua("local function a() base() end", needs=(base,))
    b = Lua("local function b() base() a() end", needs=(base, a))
    assert script(a, b, "return 1").split("\n") == [base.source, a.source, b.source, "return 1"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_defines_each_function_once_and_slices_nothing(name):
    source = SCRIPTS[name]
    defined = re.findall(r"local function (\w+)", source)
    assert len(defined) == len(set(defined)), f"{name} defines twice: {sorted(defined)}"
    assert "slice(" not in source and not re.search(r"KEYS, \d+, \d+\)", source.replace("unpack(KEYS", ""))
