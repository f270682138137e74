"""The documentation site (docs/, built by `make docs`): every public name has an API entry, and every
runnable code sample in the guides runs.

* API coverage: each ``::: path`` directive in ``docs/api/*.md`` is resolved to its Python object; every
  name in ``__all__`` of ``tdfunc`` and of each namespace must be one of them (a submodule: its own
  ``::: tdfunc.<ns>`` page), so a new public name without an entry fails here.
* Guides: the ```` ```python ```` blocks of ``docs/**/*.md`` that contain ``>>>`` run as doctests, one
  page at a time, its blocks in order in one namespace, after ``torch.manual_seed(0)``.  Peers' code
  (captum, TransformerLens, tdhook) is written without ``>>>`` and is not run.
* The strict build itself (broken links and cross-references fail) is ``make docs``, a step of
  ``make test``.
"""

from __future__ import annotations

import doctest
import importlib
import re
import types
from pathlib import Path

import pytest
import torch

import tdfunc

DOCS = Path(__file__).resolve().parent.parent / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.M)
NAMESPACES = ["tdfunc", "tdfunc.attribution", "tdfunc.lrp_rules", "tdfunc.latent", "tdfunc.weights"]
if importlib.util.find_spec("tdfunc.plot") is not None:
    NAMESPACES.append("tdfunc.plot")
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
GUIDES = sorted(p for p in DOCS.rglob("*.md") if "api" not in p.relative_to(DOCS).parts)


def resolve(path: str) -> object:
    """The object ``a.b.c`` names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def documented() -> dict[int, str]:
    """``{id(object): directive}`` for every ``::: path`` in the API pages."""
    out = {}
    for page in API_PAGES:
        for path in DIRECTIVE.findall(page.read_text()):
            out[id(resolve(path))] = f"{page.name}: ::: {path}"
    return out


def test_api_pages_resolve():
    assert API_PAGES, "docs/api/*.md missing"
    for page in API_PAGES:
        for path in DIRECTIVE.findall(page.read_text()):
            resolve(path)  # raises for a stale entry (a renamed or removed name)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_name_has_an_api_entry(namespace):
    docs = documented()
    module = importlib.import_module(namespace)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if id(obj) not in docs:
            missing.append(f"{namespace}.{name}" + (" (module)" if isinstance(obj, types.ModuleType) else ""))
    assert not missing, f"public names without an entry in docs/api/*.md (add `::: <path>`): {missing}"


def doctest_blocks(page: Path) -> str:
    return "\n".join(block for block in FENCE.findall(page.read_text()) if ">>>" in block)


@pytest.mark.parametrize("page", [p for p in GUIDES if doctest_blocks(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_examples_run(page):
    torch.manual_seed(0)
    text = doctest_blocks(page)
    test = doctest.DocTestParser().get_doctest(text, {"torch": torch, "tdfunc": tdfunc}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def test_guides_have_examples():
    # the pages whose samples are tdfunc code keep runnable ones (guards against the regex silently matching nothing)
    pages = {p.name for p in GUIDES if doctest_blocks(p)}
    assert {"index.md", "getting-started.md", "concepts.md", "migrating.md", "performance.md"} <= pages
