"""Lua functions that scripts compose, each defined once in a script however many need it.

A script that acts for several modules in one round trip (``worker.attempts``' admission
calls the ledger's claim, the breaker's gate and the limiter's reservation) is built from
their functions. Each function names what it needs (``redis_now``, the ledger's prelude,
the function it calls), and :func:`script` puts every one of them in once, needs first:
concatenating the sources would repeat a shared prelude once per function that carries it.

Written by hand: redis-py registers a script's text and nothing more, and Redis 7's
``FUNCTION`` libraries would be loaded apart from the code that calls them (a deploy
that changes one must load the other first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class Lua:
    """Lua source defining functions (or locals), and the parts it needs defined before it."""

    source: str
    needs: tuple[Lua, ...] = ()


def script(*parts: Lua | str) -> str:
    """One script's source: every :class:`Lua` part's needs, then the part, each once, in
    order; a ``str`` part (the script's body) as it is."""
    out: list[str] = []
    seen: set[int] = set()

    def add(part: Lua | str) -> None:
        if isinstance(part, str):
            out.append(part)
            return
        if id(part) in seen:
            return
        for need in part.needs:
            add(need)
        seen.add(id(part))
        out.append(part.source)

    for part in parts:
        add(part)
    return "\n".join(out)


SECTIONS = Lua("""
-- ``t[first..]`` cut into consecutive tables of the lengths that follow: how a script
-- that composes several functions hands each its own KEYS and ARGV.
local function sections(t, first, ...)
  local out, i = {}, first
  for _, n in ipairs({...}) do
    local part = {}
    for j = i, i + tonumber(n) - 1 do part[#part + 1] = t[j] end
    out[#out + 1] = part
    i = i + tonumber(n)
  end
  return unpack(out)
end
""")
"""Lua: ``sections(t, first, n1, n2, ...)`` returns ``t``'s items from ``first`` on, cut in
tables of ``n1``, ``n2``..."""
