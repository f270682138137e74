"""Site strings: parsing, resolution to modules, and installing / removing the site hooks.

Grammar::

    site   := path ["/" op] [":" port] ["@" call]
    path   := dotted module name as in ``named_modules()``; segments may be globs
              ("*" and "?" within a segment, "**" for any number of segments)
    op     := a torch operation called while the module's forward runs ("softmax", "matmul", ...;
              see ``_ops.OPS``): the site is that operation's output / inputs, not the module's
    port   := "output" | "output.N" | "output.KEY" | "input" | "input.N" | "input.NAME"  (default "output")
              (KEY: a key of a dict / ModelOutput output; NAME: an argument of the module's forward,
              passed by keyword or positionally)
    call   := N | "*"                                           (default: every call)
"""

from __future__ import annotations

import difflib
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._errors import SiteError, TdfuncTypeError, public, suggest
from ._ops import OPS

__all__ = ["SiteSpec", "ALL_CALLS", "parse_site", "resolve_site", "acquire", "release", "remove_sites", "is_installed"]

#: ``call`` value of a ``"path@*"`` site.
ALL_CALLS = -1


@dataclass(frozen=True)
class SiteSpec:
    text: str  # the site string as given
    path: str
    port: str  # "input" | "output"
    element: int | str | None  # positional input / tuple-output element, or a name / key; None = default
    call: int | None  # None: every call, k: the k-th call, ALL_CALLS: every call, kept apart
    suffix: str  # the "/op:port@call" part, reused for glob expansions
    op: str | None = None  # an operation site: the torch operation called under the module ``path``

    @property
    def is_glob(self) -> bool:
        return any(c in self.path for c in "*?")


def _bad(text: object, why: str) -> SiteError:
    return SiteError(
        f"bad site {text!r}: {why}. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', "
        "'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'."
    )


def parse_site(text: object) -> SiteSpec:
    """Parse a site string (see the module docstring)."""
    if not isinstance(text, str):
        raise _bad(text, f"expected a string, got {type(text).__name__}")
    rest, call = text, None
    if "@" in rest:
        rest, _, c = rest.rpartition("@")
        if c == "*":
            call = ALL_CALLS
        elif c.isdigit():
            call = int(c)
        else:
            raise _bad(text, f"the call index after '@' must be a non-negative integer or '*', got {c!r}")
    path, port = rest, "output"
    element: int | str | None = None
    if ":" in rest:
        path, _, p = rest.partition(":")
        name, _, idx = p.partition(".")
        if name not in ("input", "output"):
            raise _bad(text, f"the port after ':' must be 'input' or 'output', got {name!r}")
        port = name
        if idx:
            if idx.isdigit():
                element = int(idx)
            elif idx.isidentifier():
                element = idx
            else:
                raise _bad(
                    text,
                    f"the element after '{name}.' must be an integer or a name (a keyword input, an output "
                    f"key), got {idx!r}",
                )
    op = None
    if "/" in path:
        path, _, op = path.partition("/")
        if op not in OPS:
            close = difflib.get_close_matches(op, list(OPS), n=1, cutoff=0.5)
            raise _bad(
                text,
                f"unknown operation {op!r} after '/'"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; operation sites name one of {sorted(OPS)}",
            )
    if not path:
        raise _bad(text, "it names no module path (the root module's output is the call's return value)")
    suffix = text[len(path) :]
    return SiteSpec(text, path, port, element, call, suffix, op)


# the glob grammar lives in _match.py (one matcher for every function that takes site patterns);
# these names stay importable from here
from ._match import _deep_match as _deep_match  # noqa: E402
from ._match import _glob as _glob  # noqa: E402
from ._match import path_match as _path_match  # noqa: E402


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


def resolve_site(root: nn.Module, spec: SiteSpec, table: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a site refers to; raises SiteError with the nearest names."""
    if not spec.is_glob:
        m = table.get(spec.path)
        if m is None:
            raise SiteError(
                f"unknown site {spec.text!r}: {type(root).__name__} has no submodule {spec.path!r}."
                f"{suggest(spec.path, table)} List the names with [n for n, _ in model.named_modules()]."
            )
        return [(spec.path, m)]
    pats = spec.path.split(".")
    found = [(name, m) for name, m in table.items() if _path_match(pats, name.split("."))]
    if not found:
        head = [n for n in table if "." not in n][:8]
        raise SiteError(
            f"site pattern {spec.text!r} matches no submodule of {type(root).__name__} "
            f"('*' matches within one name segment, '**' across segments; top-level names: {head})."
            f"{suggest(spec.path, table)}"
        )
    return found


# --- the site hooks and their lifecycle -----------------------------------------------------------
# Both hooks are module-level functions (not closures): they survive copy.deepcopy and pickling of
# the module, and a copied module's hooks address the copy.  They are inert outside a tdfunc call.
#
# A call acquires the sites of its plan before it pushes its frame and releases them in ``finally``
# after popping it: the first user installs the two hooks, the last one removes them, so after the
# call the module's hook dicts are what they were.  The count is per module and changes only under
# ``_INSTALL_LOCK``, so two threads (or nested calls) sharing a site never remove it from under each
# other.  ``install_sites`` pins a site (kept at count 0, e.g. for ``torch.compile``, where hooks
# cannot be added); ``remove_sites`` removes pinned and unpinned sites alike.  Inside a compiled
# region nothing is counted or installed: the site must be pinned.


def is_installed(module: nn.Module) -> bool:
    from ._runtime import output_hook

    return any(h is output_hook for h in module._forward_hooks.values())


_HOOK_FNS: tuple | None = None


def _hook_fns() -> tuple:
    """(input_hook, output_hook), imported once (``_runtime`` imports this module)."""
    global _HOOK_FNS
    if _HOOK_FNS is None:
        from ._runtime import input_hook, output_hook

        _HOOK_FNS = (input_hook, output_hook)
    return _HOOK_FNS


class _Site:
    """tdfunc's hooks on one module: how many running calls use them, and whether they are pinned.

    The hooks are written into the module's hook dicts exactly as ``register_forward_pre_hook`` /
    ``register_forward_hook(..., with_kwargs=True)`` write them (ids from torch's own counter), minus
    the two ``RemovableHandle`` objects, which cost more than the rest of an install and removal.
    The with-kwargs flag goes in before the hook and comes out after it.
    """

    __slots__ = ("users", "pinned", "hook_id")

    def __init__(self, module: nn.Module):
        input_hook, output_hook = _hook_fns()
        self.users = 0
        if any(h is output_hook for h in module._forward_hooks.values()):
            # the hooks came with the module (a deepcopy or pickle of a module with pinned sites, or
            # of one copied while a call used it): they stay until remove_sites, as if pinned
            self.pinned, self.hook_id = True, None
            return
        self.pinned = False
        i = self.hook_id = RemovableHandle.next_id
        RemovableHandle.next_id = i + 2
        module._forward_pre_hooks_with_kwargs[i] = True
        module._forward_pre_hooks[i] = input_hook
        module._forward_hooks_with_kwargs[i + 1] = True
        module._forward_hooks[i + 1] = output_hook

    def remove(self, module: nn.Module) -> None:
        i = self.hook_id
        if i is not None:
            module._forward_pre_hooks.pop(i, None)
            module._forward_pre_hooks_with_kwargs.pop(i, None)
            module._forward_hooks.pop(i + 1, None)
            module._forward_hooks_with_kwargs.pop(i + 1, None)


_INSTALL_LOCK = threading.Lock()
_SITES: weakref.WeakKeyDictionary[nn.Module, _Site] = weakref.WeakKeyDictionary()


def _not_installed(name: str) -> SiteError:
    return SiteError(
        f"site {name!r} is used inside torch.compile but its hook is not installed, and hooks "
        f"cannot be added inside a compiled region. Call tdfunc.install_sites(model, [{name!r}]) "
        "(or tdfunc.install_sites(model, '**')) once before compiling."
    )


def acquire(modules: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, _Site]] | None:
    """Install the sites of ``modules`` for one call (or count one more user); give to :func:`release`.

    Inside ``torch.compile`` nothing is counted or installed: every site must already be installed
    (pinned with ``tdfunc.install_sites``), else SiteError.
    """
    if torch.compiler.is_compiling():
        for name, m in modules:
            if not is_installed(m):
                raise _not_installed(name)
        return None
    held = []
    with _INSTALL_LOCK:
        for _, m in modules:
            site = _SITES.get(m)
            if site is None:
                site = _SITES[m] = _Site(m)
            site.users += 1
            held.append((m, site))
    return held


def release(held: list[tuple[nn.Module, _Site]] | None) -> None:
    """Undo one :func:`acquire`: the last user of an unpinned site removes its hooks."""
    if not held:
        return
    with _INSTALL_LOCK:
        for m, site in held:
            site.users -= 1
            if site.users == 0 and not site.pinned:
                site.remove(m)  # no-op for hooks remove_sites already took off
                if _SITES.get(m) is site:  # not already dropped by remove_sites (and maybe reinstalled)
                    del _SITES[m]


@public("tdfunc.remove_sites")
def remove_sites(module: nn.Module) -> int:
    """Remove every tdfunc site hook from ``module`` and its submodules, pinned or not.

    A call running in another thread at that moment loses its edits and captures on these modules.

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
    with _INSTALL_LOCK:
        for m in module.modules():
            _SITES.pop(m, None)  # a call still holding it removes nothing more when it ends
            hit = False
            for hooks, h in ((m._forward_hooks, output_hook), (m._forward_pre_hooks, input_hook)):
                for k in [k for k, v in hooks.items() if v is h]:
                    del hooks[k]
                    m._forward_hooks_with_kwargs.pop(k, None)
                    m._forward_pre_hooks_with_kwargs.pop(k, None)
                    hit = True
            n += hit
    return n


@public("tdfunc.install_sites")
def install_sites(module: nn.Module, sites: str | list[str] | tuple[str, ...]) -> None:
    """Install (pin) the hooks of ``sites`` on ``module`` ahead of time, until :func:`tdfunc.remove_sites`.

    Without it, a call installs the sites it uses and removes them when it returns (the last of
    several concurrent or nested calls sharing a site removes it).  Inside ``torch.compile`` hooks
    cannot be added or removed, so pin every site a compiled function will use before compiling it.
    A pinned site is inert outside a tdfunc call (the module computes exactly what it did, though
    torch's hook-free fast paths, e.g. ``nn.TransformerEncoderLayer``'s, are then skipped);
    :func:`tdfunc.remove_sites` removes them all.

    Args:
        module: the root module.
        sites: a site string or a list of them; globs allowed (``"**"`` installs every submodule).
            An operation site (``"blocks.0.attn/softmax"``) installs its module and the module's submodules.

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
    if not isinstance(module, nn.Module):
        raise TypeError(f"tdfunc.install_sites: expected an nn.Module, got {type(module).__name__}.")
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, (list, tuple)):
        raise TdfuncTypeError(
            f"sites must be a site string or a list of site strings, got {type(sites).__name__} "
            f"({sites!r:.60}); e.g. tdfunc.install_sites(model, ['blocks.*.mlp']), or '**' for every submodule."
        )
    table = module_table(module)
    found = []
    for s in sites:
        spec = parse_site(s)
        for name, m in resolve_site(module, spec, table):
            found.append((name, m))
            if spec.op is not None:  # an operation site also hooks the submodules (they pause its scope)
                found += [(n, d) for n, d in m.named_modules(prefix=name) if d is not m]
    if torch.compiler.is_compiling():
        acquire(found)  # checks only: hooks cannot be added here
        return
    with _INSTALL_LOCK:
        for _, m in found:
            site = _SITES.get(m)
            if site is None:
                site = _SITES[m] = _Site(m)
            site.pinned = True
