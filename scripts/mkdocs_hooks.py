"""mkdocs hooks (mkdocs.yml `hooks:`): the pages made from the code at build time.

- docs/methods.md: its marker is replaced by the catalogue of every registered method: registry name, class,
  what it keeps (the first line of its docstring), the papers the docstring cites, the phase it acts in, the
  calibration it loads, its settings (constructor defaults) and the rest of its docstring;
- api/methods.md: one mkdocstrings entry per method class;
- changelog.md: the repository's CHANGELOG.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from methods_table import papers  # noqa: E402  the paper links scripts/methods_table.py gives the README table

MARKER = "<!-- catalogue: generated from the registry at build time -->"
ROOT = Path(__file__).resolve().parent.parent


def registry() -> dict:
    import kvsqueeze

    return kvsqueeze.available()


def settings(cls) -> str:
    """The method's settings (its dataclass fields) with their defaults, as code."""
    shown = [f"`{f.name}`" if f.default is dataclasses.MISSING else f"`{f.name}={f.default!r}`"
             for f in dataclasses.fields(cls)]
    return ", ".join(shown) or "—"


def api_anchor(cls) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def calibration(cls) -> str:
    if not cls.calibration:
        return "—"
    command = f"`kvsqueeze calibrate {cls.calibration}`"
    return command if cls.calibration_required else f"optional: {command}"


def catalogue() -> str:
    """Markdown: a summary table of every method, then one section each."""
    methods = registry()
    out = ["| name | class | phase | keeps | paper |", "|---|---|---|---|---|"]
    for name, cls in methods.items():
        out.append(f"| [`{name}`](#{name}) | `{cls.__name__}` | {cls.phase} | {cls.summary()} | {papers(cls)} |")
    for name, cls in methods.items():
        body = inspect.getdoc(cls).split("\n", 1)[1].strip() if "\n" in inspect.getdoc(cls) else ""
        out += ["", f"## `{name}` {{#{name}}}", "", cls.summary(), "",
                "| | |", "|---|---|",
                f"| class | [`kvsqueeze.{cls.__name__}`][{api_anchor(cls)}] |",
                f"| paper | {papers(cls)} |",
                f"| acts at | {cls.phase} |",
                f"| calibration | {calibration(cls)} |",
                f"| settings | {settings(cls)} |"]
        if body:
            indented = [f"    {line}" if line else "" for line in body.split("\n")]
            out += ["", '??? note "From its docstring"', ""] + indented
    return "\n".join(out) + "\n"


def api_methods() -> str:
    entries = ["# Methods", "", "Every method class, from its docstring. The [catalogue](../methods.md) lists them "
               "with their papers and settings.", ""]
    for cls in sorted(registry().values(), key=lambda c: c.__name__):
        entries += [f"::: {api_anchor(cls)}", "    options:", "      members: false", ""]
    return "\n".join(entries)


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, content in (("api/methods.md", api_methods()),
                          ("changelog.md", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))):
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "methods.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/methods.md lost its marker {MARKER!r}")
        return markdown.replace(MARKER, catalogue())
    return markdown
