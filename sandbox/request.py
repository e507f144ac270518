"""One request as :mod:`sandbox.api` and :mod:`sandbox.admin` see it: no HTTP library in sight.

The server (:mod:`sandbox.server`) builds it from what aiohttp parsed, so the Plural
paths, the admin API and their tests never depend on the HTTP layer underneath.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(slots=True)
class Request:
    method: str
    path: str
    """The path, percent-decoded, without the query string."""
    headers: Mapping[str, str]
    """Looked up case-insensitively (``headers.get("request-id")``)."""
    body: bytes = b""
    query: dict[str, list[str]] = field(default_factory=dict)
    """The query string's values by name, as ``urllib.parse.parse_qs`` gives them."""

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` if it is not."""
        if not self.body:
            raise ValueError("request body is empty")
        return json.loads(self.body)
