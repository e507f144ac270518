"""``python -m sandbox --port N``: the local Plural."""

from plural_cancel.sandbox.cli import main

raise SystemExit(main())
