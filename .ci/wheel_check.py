"""Check the built distributions the way a user installs them (run by ``make test`` in a fresh venv).

Usage: ``python wheel_check.py SOURCE_DIR DIST_DIR`` with the interpreter of a virtual environment that
has only torch, the core dependencies and the wheel installed, run from outside the checkout.

1. the wheel built from the sdist equals the wheel built from the tree, file by file;
2. it holds every module of the source tree, ``py.typed`` and the LICENSE;
3. ``tdfunc`` imports from site-packages (not the checkout) and every submodule imports;
4. the README's first example and every docstring example run; an example that needs an optional
   dependency (an extra) that is not installed is skipped, and the reason printed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pathlib
import pkgutil
import re
import sys
import zipfile

#: extras-only modules a docstring example may import, and the extra that installs each
OPTIONAL = {"sklearn": "probing", "matplotlib": "plot", "transformers": "hf"}
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def fail(msg: str) -> None:
    print(f"wheel check FAILED: {msg}")
    sys.exit(1)


def wheel_files(path: pathlib.Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def check_distributions(src: pathlib.Path, dist: pathlib.Path) -> None:
    from_sdist = sorted(dist.glob("tdfunc-*.whl"))
    from_tree = sorted((dist / "tree").glob("tdfunc-*.whl"))
    sdists = sorted(dist.glob("tdfunc-*.tar.gz"))
    if len(from_sdist) != 1 or len(from_tree) != 1 or len(sdists) != 1:
        fail(f"expected one sdist and two wheels, found {sdists}, {from_sdist}, {from_tree}")
    a, b = wheel_files(from_sdist[0]), wheel_files(from_tree[0])
    if a != b:
        diff = sorted(set(a) ^ set(b)) or sorted(n for n in a if a[n] != b[n])
        fail(f"the wheel built from the sdist differs from the wheel built from the tree: {diff}")
    names = set(a)
    want = {p.relative_to(src).as_posix() for p in (src / "tdfunc").rglob("*.py")}
    want.add("tdfunc/py.typed")
    missing = sorted(want - names)
    if missing:
        fail(f"the wheel lacks {missing}")
    if not any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names):
        fail("the wheel ships no LICENSE")
    print(f"wheel check: {from_sdist[0].name} = the tree's wheel; {len(want)} package files, LICENSE shipped")


def import_all(src: pathlib.Path) -> list:
    import tdfunc

    where = pathlib.Path(tdfunc.__file__).resolve()
    if where.is_relative_to((src / "tdfunc").resolve()) or "site-packages" not in where.parts:
        fail(f"tdfunc was imported from the checkout ({where}), not from the installed wheel")
    mods, skipped = [tdfunc], []
    for info in pkgutil.walk_packages(tdfunc.__path__, "tdfunc.", onerror=lambda name: None):
        if any(info.name.startswith(s + ".") for s in skipped):
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except ImportError as e:
            if "tdfunc[" not in str(e):  # only a module that needs an extra may fail, naming the extra
                raise
            print(f"  skipped module {info.name}: {e}")
            skipped.append(info.name)
    print(f"wheel check: tdfunc {tdfunc.__version__} from {where.parent}; {len(mods)} modules import")
    return mods


def missing_extra(test: doctest.DocTest) -> str | None:
    for ex in test.examples:
        for mod, extra in OPTIONAL.items():
            if re.search(rf"\b(import|from)\s+{mod}\b", ex.source) and importlib.util.find_spec(mod) is None:
                return f"needs {mod} (pip install 'tdfunc[{extra}]')"
    return None


class NeedsExtra(Exception):
    """A docstring example called a function that needs an optional package (its ImportError names the extra)."""


class Runner(doctest.DocTestRunner):
    def report_unexpected_exception(self, out, test, example, exc_info):
        err = exc_info[1]
        if isinstance(err, ImportError) and "tdfunc[" in str(err):
            raise NeedsExtra(str(err))
        super().report_unexpected_exception(out, test, example, exc_info)


def run_doctests(src: pathlib.Path, mods: list) -> None:
    import torch

    tests = []
    readme = (src / "README.md").read_text()
    first = re.search(r"## First example\s+```python\n(.*?)```", readme, re.S)
    if first is None:
        fail("README.md has no '## First example' python block")
    parser = doctest.DocTestParser()
    tests.append(parser.get_doctest(first.group(1), {}, "README.md: First example", "README.md", 0))
    finder = doctest.DocTestFinder()
    seen = set()
    for m in mods:
        for t in finder.find(m, m.__name__):
            if t.examples and t.name not in seen:
                seen.add(t.name)
                tests.append(t)
    runner = Runner(optionflags=FLAGS)
    passed = skipped = 0
    for t in tests:
        why = missing_extra(t)
        if why is not None:
            print(f"  skipped {t.name}: {why}")
            skipped += 1
            continue
        torch.manual_seed(0)  # as conftest.py does for the doctests of the test suite
        try:
            r = runner.run(t)
        except NeedsExtra as e:
            print(f"  skipped {t.name}: {e}")
            skipped += 1
            continue
        if r.failed:
            fail(f"docstring example {t.name} failed (output above)")
        passed += 1
    print(f"wheel check: {passed} examples passed, {skipped} skipped (README first example included)")


def main() -> None:
    src, dist = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    check_distributions(src, dist)
    run_doctests(src, import_all(src))


if __name__ == "__main__":
    main()
