"""``plural-cancel``: the operator's command line. Thin: it parses, calls the API, prints.

Exit status: 0 on success, 2 on bad input (one line on stderr), 1 otherwise; a Redis that
is away or refuses writes is one line and 1 for every command (``base.Commands``).
Each module of this package holds a few commands; this one gathers them, and loads a
module only when one of its commands is called (``base.Commands``).
"""

from __future__ import annotations

import sys

import click

from plural_cancel.cli.base import Commands
from plural_cancel.cli.health import health

LAZY = {"enqueue": "cancels", "status": "cancels", "sandbox": "cancels",
        "failed": "ops", "stats": "ops", "check": "ops",
        "bulk": "schedule", "schedule": "schedule", "unschedule": "schedule"}
"""Each command but ``health``, and the module of this package whose ``COMMANDS`` hold it."""


@click.group(cls=Commands, lazy=LAZY, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Cancel Pine Labs Plural payment links through the background worker."""


cli.add_command(health)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="plural-cancel", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.UsageError as exc:
        click.echo(f"plural-cancel: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
