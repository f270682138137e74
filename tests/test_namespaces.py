"""The namespace rule (README "Namespaces") and the import graph behind it."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import warnings

import pytest

import tdfunc

FAMILIES = ("attribution", "latent", "weights")
SPACES = FAMILIES + ("lrp_rules",)
ROOT = pathlib.Path(tdfunc.__file__).resolve().parent


def test_top_level_is_core_plus_attribution():
    core = {
        "functional_call",
        "intervene",
        "state",
        "delta",
        "rule",
        "from_site",
        "Delta",
        "Rule",
        "FromSite",
        "Tap",
        "install_sites",
        "remove_sites",
        "TdfuncError",
        "SiteError",
        "EditError",
        "StateError",
        "NotReachedError",
        "list_sites",
        "grad_edit",
        "GradEdit",
    }
    assert set(tdfunc.__all__) == core | set(SPACES) | set(tdfunc.attribution.__all__)
    assert len(tdfunc.__all__) == len(set(tdfunc.__all__))
    for name in tdfunc.attribution.__all__:
        assert getattr(tdfunc, name) is getattr(tdfunc.attribution, name)


@pytest.mark.parametrize("space", SPACES)
def test_each_namespace_lists_its_names_once_and_they_resolve(space):
    module = getattr(tdfunc, space)
    assert module.__all__ == sorted(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is not None
    assert importlib.import_module(f"tdfunc.{space}") is module


def test_each_family_has_its_error_class():
    assert issubclass(tdfunc.attribution.AttributionError, tdfunc.TdfuncError)
    assert issubclass(tdfunc.weights.WeightError, tdfunc.TdfuncError)
    for cls in (
        tdfunc.latent.CacheError,
        tdfunc.latent.PatchError,
        tdfunc.latent.ProbeError,
        tdfunc.latent.GeometryError,
    ):
        assert issubclass(cls, tdfunc.latent.LatentError) and issubclass(cls, ValueError)
    assert issubclass(tdfunc.latent.LatentError, tdfunc.TdfuncError)


def test_no_name_in_two_families():
    seen: dict[str, str] = {}
    for space in SPACES:
        for name in getattr(tdfunc, space).__all__:
            assert name not in seen, f"{name} is in tdfunc.{seen[name]} and tdfunc.{space}"
            seen[name] = space


@pytest.mark.parametrize(
    "old, new",
    [
        ("patch", "latent.patch"),
        ("prune_masks", "weights.prune_masks"),
        ("CacheError", "latent.CacheError"),
        ("lrp_epsilon", "lrp_rules.epsilon"),
        ("lrp_pass", "lrp_rules.gradient"),
        ("merge_batchnorm", "lrp_rules.merge_batchnorm"),
    ],
)
def test_moved_names_forward_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning) as record:
        got = getattr(tdfunc, old)
    note = " (it keeps the plain gradient; zennit's and tdhook's Pass is tdfunc.lrp_rules.passthrough)" * (
        old == "lrp_pass"
    )
    assert (
        str(record[0].message)
        == f"tdfunc.{old} moved to tdfunc.{new}; the old name will be removed in tdfunc 0.3.{note}"
    )
    space, name = new.split(".")
    assert got is getattr(getattr(tdfunc, space), name)


def test_unknown_attribute_is_an_attribute_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match=r"^module 'tdfunc' has no attribute 'lrp_merge_batchnorm'$"):
            tdfunc.lrp_merge_batchnorm  # noqa: B018
        assert not hasattr(tdfunc, "no_such_name")


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in a file of the package."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out


def test_no_family_reaches_into_another_family():
    """A family imports the core and its own modules only; what two families share lives in the core."""
    bad = []
    for family in FAMILIES:
        for path in sorted((ROOT / family).glob("*.py")):
            for mod, _ in _imports(path):
                parts = mod.split(".")
                if parts[0] == "tdfunc" and len(parts) > 1 and parts[1] in FAMILIES and parts[1] != family:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_core_imports_no_family():
    bad = []
    for path in sorted(p for p in ROOT.glob("_*.py") if p.name != "__init__.py"):
        for mod, _ in _imports(path):
            parts = mod.split(".")
            if len(parts) > 1 and parts[1] in SPACES:
                bad.append(f"{path.name} imports {mod}")
    assert not bad, bad


def test_public_functions_have_docstring_examples():
    missing = []
    for space in SPACES:
        module = getattr(tdfunc, space)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and ">>>" not in (obj.__doc__ or ""):
                missing.append(f"{space}.{name}")
    assert not missing, f"public functions without a docstring example: {missing}"


def _public_functions():
    for space in ("",) + SPACES + ("plot",):
        module = importlib.import_module(f"tdfunc.{space}" if space else "tdfunc")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                top = not space or space == "attribution"
                yield f"tdfunc.{name}" if top else f"tdfunc.{space}.{name}", obj


@pytest.mark.parametrize("expected, obj", list(_public_functions()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_function_names_its_errors_at_its_boundary(expected, obj):
    """Each public function is marked ``@public(name)`` (tdfunc/_errors.py): a TdfuncError raised inside it
    without a name leaves it as ``"{name}: ..."``; the name is the one users call it by."""
    assert getattr(obj, "__tdfunc_public__", None) == expected


def test_no_private_function_threads_the_public_name():
    """The name is added at the boundary, not passed down: no function in tdfunc/ takes an ``fn: str``."""
    threaded = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if a.annotation is not None and ast.unparse(a.annotation) in ("str", "str | None"):
                        if a.arg in ("fn", "fn_name", "public_name"):
                            threaded.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not threaded, threaded
