"""``settings-reference``: the table of every environment variable the product reads, made
from ``config/settings.py``'s own ``REFERENCE`` at build time, so it cannot drift from the code.

Each row: the name, what it means, what it accepts (the range the settings enforce), and
its default: the value ``Settings.from_env({})`` gives the field the variable sets.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def default_of(variable, defaults) -> str:
    """The variable's default as a reader would set it, or ``unset``."""
    value = getattr(defaults, variable.field) if variable.field else None
    if value is None or value == () or value == "":
        return "unset"
    if isinstance(value, float) and value == int(value):
        value = int(value)
    return str(value)


class SettingsReference(SphinxDirective):
    """Render :data:`plural_cancel.config.settings.REFERENCE` as a table."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from plural_cancel.config.settings import REFERENCE, Settings

        defaults = Settings.from_env({})
        rows = [(f"{v.name}", v.meaning, v.accepted(), default_of(v, defaults)) for v in REFERENCE]
        table = nodes.table(classes=["settings-reference"])
        group = nodes.tgroup(cols=4)
        table += group
        for width in (20, 35, 30, 15):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row(("variable", "meaning", "accepts", "default"), literal_first=False)
        body = nodes.tbody()
        group += body
        for row in rows:
            body += self._row(row, literal_first=True)
        return [table]

    @staticmethod
    def _row(cells, literal_first: bool) -> nodes.row:
        row = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry()
            paragraph = nodes.paragraph()
            if (i == 0 and literal_first) or (i == 3 and text != "unset" and literal_first):
                paragraph += nodes.literal(text=text)
            else:
                paragraph += nodes.Text(text)
            entry += paragraph
            row += entry
        return row


def setup(app):
    app.add_directive("settings-reference", SettingsReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
