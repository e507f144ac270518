"""``python -m sandbox --port N``: the local Plural."""

from sandbox.cli import main

raise SystemExit(main())
