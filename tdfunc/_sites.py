"""Site strings: parsing, resolution to modules, and installing the persistent hooks.

Grammar::

    site   := path [":" port] ["@" call]
    path   := dotted module name as in ``named_modules()``; segments may be globs
              ("*" and "?" within a segment, "**" for any number of segments)
    port   := "output" | "output.N" | "input" | "input.N"      (default "output")
    call   := N | "*"                                           (default: every call)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import SiteError, suggest

__all__ = ["SiteSpec", "ALL_CALLS", "parse_site", "resolve_site", "install", "remove_sites", "is_installed"]

#: ``call`` value of a ``"path@*"`` site.
ALL_CALLS = -1


@dataclass(frozen=True)
class SiteSpec:
    text: str  # the site string as given
    path: str
    port: str  # "input" | "output"
    element: int | None  # positional input / tuple-output element; None = default
    call: int | None  # None: every call, k: the k-th call, ALL_CALLS: every call, kept apart
    suffix: str  # the ":port@call" part, reused for glob expansions

    @property
    def is_glob(self) -> bool:
        return any(c in self.path for c in "*?")


def _bad(fn: str, text: object, why: str) -> SiteError:
    return SiteError(
        f"{fn}: bad site {text!r}: {why}. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', "
        "'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'."
    )


def parse_site(fn: str, text: object) -> SiteSpec:
    """Parse a site string (see the module docstring)."""
    if not isinstance(text, str):
        raise _bad(fn, text, f"expected a string, got {type(text).__name__}")
    rest, call = text, None
    if "@" in rest:
        rest, _, c = rest.rpartition("@")
        if c == "*":
            call = ALL_CALLS
        elif c.isdigit():
            call = int(c)
        else:
            raise _bad(fn, text, f"the call index after '@' must be a non-negative integer or '*', got {c!r}")
    path, port, element = rest, "output", None
    if ":" in rest:
        path, _, p = rest.partition(":")
        name, _, idx = p.partition(".")
        if name not in ("input", "output"):
            raise _bad(fn, text, f"the port after ':' must be 'input' or 'output', got {name!r}")
        port = name
        if idx:
            if not idx.isdigit():
                raise _bad(fn, text, f"the element index after '{name}.' must be an integer, got {idx!r}")
            element = int(idx)
    if not path:
        raise _bad(fn, text, "it names no module path (the root module's output is the call's return value)")
    suffix = text[len(path):]
    return SiteSpec(text, path, port, element, call, suffix)


# the glob grammar lives in _match.py (one matcher for every function that takes site patterns);
# these names stay importable from here
from ._match import _deep_match as _deep_match  # noqa: E402
from ._match import _glob as _glob  # noqa: E402
from ._match import path_match as _path_match  # noqa: E402
from ._match import seg_match as _seg_match  # noqa: E402


def module_table(root: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by dotted name (the root excluded), shared modules under each of their names."""
    table: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for k, child in module._modules.items():
            if child is not None:
                table[prefix + k] = child
                visit(child, prefix + k + ".")

    visit(root, "")
    return table


def resolve_site(fn: str, root: nn.Module, spec: SiteSpec, table: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a site refers to; raises SiteError with the nearest names."""
    if not spec.is_glob:
        m = table.get(spec.path)
        if m is None:
            raise SiteError(
                f"{fn}: unknown site {spec.text!r}: {type(root).__name__} has no submodule {spec.path!r}."
                f"{suggest(spec.path, table)} List the names with [n for n, _ in model.named_modules()]."
            )
        return [(spec.path, m)]
    pats = spec.path.split(".")
    found = [(name, m) for name, m in table.items() if _path_match(pats, name.split("."))]
    if not found:
        head = [n for n in table if "." not in n][:8]
        raise SiteError(
            f"{fn}: site pattern {spec.text!r} matches no submodule of {type(root).__name__} "
            f"('*' matches within one name segment, '**' across segments; top-level names: {head})."
            f"{suggest(spec.path, table)}"
        )
    return found


# --- the persistent hooks -------------------------------------------------------------------------
# Both hooks are module-level functions (not closures): they survive copy.deepcopy and pickling of
# the module, and a copied module's hooks address the copy.  They are inert outside a tdfunc call.


def is_installed(module: nn.Module) -> bool:
    from ._runtime import output_hook

    return any(h is output_hook for h in module._forward_hooks.values())


_INSTALL_LOCK = threading.Lock()


def install(fn: str, modules: list[tuple[str, nn.Module]]) -> None:
    """Install the site hooks on each module that lacks them (idempotent, thread-safe)."""
    missing = [(name, m) for name, m in modules if not is_installed(m)]
    if missing:
        _install(fn, missing)


def _install(fn: str, modules: list[tuple[str, nn.Module]]) -> None:
    from ._runtime import input_hook, output_hook

    for name, m in modules:
        if torch.compiler.is_compiling():
            raise SiteError(
                f"{fn}: site {name!r} is used inside torch.compile but its hook is not installed, and hooks "
                f"cannot be added inside a compiled region. Call tdfunc.install_sites(model, [{name!r}]) "
                "(or tdfunc.install_sites(model, '**')) once before compiling."
            )
        with _INSTALL_LOCK:  # two threads installing the same site must not hook it twice
            if not is_installed(m):
                m.register_forward_pre_hook(input_hook, with_kwargs=True)
                m.register_forward_hook(output_hook, with_kwargs=True)


def remove_sites(module: nn.Module) -> int:
    """Remove every tdfunc site hook from ``module`` and its submodules.

    Returns:
        The number of modules that had sites installed.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> tdfunc.install_sites(net, "**")
        >>> tdfunc.remove_sites(net)
        2
    """
    from ._runtime import input_hook, output_hook

    if not isinstance(module, nn.Module):
        raise TypeError(f"tdfunc.remove_sites: expected an nn.Module, got {type(module).__name__}.")
    n = 0
    for m in module.modules():
        hit = False
        for hooks, h in ((m._forward_hooks, output_hook), (m._forward_pre_hooks, input_hook)):
            for k in [k for k, v in hooks.items() if v is h]:
                del hooks[k]
                m._forward_hooks_with_kwargs.pop(k, None)
                m._forward_pre_hooks_with_kwargs.pop(k, None)
                hit = True
        n += hit
    return n


def install_sites(module: nn.Module, sites: str | list[str] | tuple[str, ...]) -> None:
    """Install the hooks of ``sites`` on ``module`` ahead of time.

    tdfunc installs a site lazily the first time a call uses it.  Inside ``torch.compile`` hooks
    cannot be added, so install every site a compiled function will use before compiling it.
    An installed site is inert outside a tdfunc call (the module computes exactly what it did);
    :func:`tdfunc.remove_sites` removes them all.

    Args:
        module: the root module.
        sites: a site string or a list of them; globs allowed (``"**"`` installs every submodule).

    Raises:
        SiteError: a site names no submodule.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> tdfunc.install_sites(net, ["0"])
        >>> f = torch.compile(lambda x: tdfunc.functional_call(net, None, (x,), capture=["0"]), fullgraph=True)
        >>> tdfunc.remove_sites(net)
        1
    """
    fn = "tdfunc.install_sites"
    if not isinstance(module, nn.Module):
        raise TypeError(f"tdfunc.install_sites: expected an nn.Module, got {type(module).__name__}.")
    if isinstance(sites, str):
        sites = [sites]
    table = module_table(module)
    for s in sites:
        install(fn, resolve_site(fn, module, parse_site(fn, s), table))
