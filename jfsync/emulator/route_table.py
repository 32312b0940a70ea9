"""The emulator's routes per emulated version, as the Markdown table in docs/emulator.md.

:func:`route_matrix` builds each supported version's route list (the same
:class:`jfsync.emulator.app.JellyfinApi` routes the server answers) and :func:`markdown_table`
renders it; a test keeps the table in the docs equal to it. ``python -m
jfsync.emulator.route_table`` prints the table.
"""

from __future__ import annotations

from jfsync.emulator.state import SUPPORTED_VERSIONS

#: Cell text: documented route, undocumented legacy alias, absent.
DOCUMENTED, LEGACY, ABSENT = "yes", "legacy", "-"


def route_matrix() -> dict[tuple[str, str], dict[str, str]]:
    """Return {(template, method): {version: cell}} for every route of every version."""
    from jfsync.emulator.app import JellyfinApi
    from jfsync.emulator.server import Emulator

    matrix: dict[tuple[str, str], dict[str, str]] = {}
    for version in SUPPORTED_VERSIONS:
        emu = Emulator(library_size=1, server_version=version)
        for route in JellyfinApi(emu).routes:
            cells = matrix.setdefault((route.template, route.method), {})
            cells[version] = DOCUMENTED if route.documented else LEGACY
    return matrix


def markdown_table() -> str:
    """Render :func:`route_matrix` as a Markdown table, routes sorted by path then method."""
    header = "| route | " + " | ".join(SUPPORTED_VERSIONS) + " |"
    rule = "|---|" + "---|" * len(SUPPORTED_VERSIONS)
    lines = [header, rule]
    for (template, method), cells in sorted(route_matrix().items()):
        row = [cells.get(v, ABSENT) for v in SUPPORTED_VERSIONS]
        lines.append(f"| `{method} {template}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
