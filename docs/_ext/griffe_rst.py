"""Griffe extension: the reStructuredText bits of tdfunc's Google-style docstrings, as Markdown.

* ``:func:`tdfunc.state``` (``:class:``, ``:mod:``, ``:meth:``) becomes a cross-reference to the entry in the API
  reference when one documents that object (found by trying the name at the top level and in each
  namespace), and inline code otherwise (never a broken link: the build is ``--strict``);
* ``Example:`` becomes ``Examples:``, the section griffe renders as a Python console block (the
  singular is read as a plain admonition, whose ``>>>`` lines would be rendered as Markdown);
* ``:math:`x_i``` becomes inline math and a ``.. math::`` block display math (pymdownx.arithmatex), so
  underscores and backslashes are not read as Markdown.

The docstrings themselves stay as they are (``help()`` and IDEs show them raw).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import griffe

API_DIR = Path(__file__).resolve().parents[1] / "api"
NAMESPACES = ("", "attribution.", "lrp_rules.", "latent.", "weights.", "plot.")
ROLE = re.compile(r":(?:func|class|mod|meth|attr|obj|exc):`~?([^`]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.M)  # singular: griffe reads it as an admonition
MATH_LINE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]+(?P<body>\S.*)$", re.M)  # ".. math:: x = y" on one line
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)+)", re.M)


def documented() -> set[str]:
    """Every object path an API page renders with ``::: path``."""
    return {m.group(1) for page in API_DIR.glob("*.md") for m in re.finditer(r"^::: (\S+)", page.read_text(), re.M)}


def target(name: str, known: set[str]) -> str | None:
    bare = name.removeprefix("tdfunc.").lstrip(".")
    for ns in NAMESPACES:
        if f"tdfunc.{ns}{bare}" in known:
            return f"tdfunc.{ns}{bare}"
    return None


def convert(text: str, known: set[str]) -> str:
    def block(m: re.Match) -> str:
        indent = m.group("indent")
        body = textwrap.dedent(m.group("body")).strip("\n")
        return f"{indent}$$\n" + textwrap.indent(body, indent) + f"\n{indent}$$\n\n"

    def role(m: re.Match) -> str:
        name = m.group(1)
        where = target(name, known)
        return f"[`{name}`][{where}]" if where else f"`{name}`"

    text = EXAMPLE.sub(r"\g<indent>Examples:", text)
    text = MATH_BLOCK.sub(block, text)
    text = MATH_LINE.sub(lambda m: f"{m['indent']}$$\n{m['indent']}{m['body']}\n{m['indent']}$$\n", text)
    text = MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return ROLE.sub(role, text)


class RstToMarkdown(griffe.Extension):
    def __init__(self) -> None:
        self.known = documented()

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, self.known)
