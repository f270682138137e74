"""The calling shape shared by every attribution method.

``method(f, td, ...) -> TensorDict`` where ``f(td) -> Tensor`` has shape ``td.batch_size`` (one
target per example) or ``td.batch_size + (K,)`` (K targets), the attributed inputs are entries of
``td`` (``in_keys``; every floating-point entry by default), baselines are ``("baseline", key)``
entries (zeros when absent), and the result holds ``("attr", key)`` of shape
``batch (+ K) + feature shape``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import vjp, vmap

from .._checks import broadcasts_to, check_callable, per_input
from .._errors import TdfuncError, TdfuncTypeError, shape_str, suggest
from .._finite import check_finite, readable, warn_nonfinite

__all__ = [
    "AttributionError",
    "MiscompileError",
    "Inputs",
    "prepare",
    "with_inputs",
    "check_output",
    "grads_per_target",
    "input_gradients",
    "result",
]

BASELINE = "baseline"
Key = tuple  # nested keys are always tuples here
#: a method's ``baselines=`` argument: one baseline per input (a dict key -> value, or a bare value for one input)
Baselines = Mapping[Any, "torch.Tensor | float"] | torch.Tensor | float


class AttributionError(TdfuncError, ValueError):
    """Bad input to an attribution method (keys, baselines, shapes of ``f``'s output, options)."""


class MiscompileError(TdfuncError, RuntimeError):
    """A known silent miscompilation upstream: raised at trace time instead of returning a wrong result."""


_MAX_POOLS = tuple(
    getattr(mod, name)
    for mod, names in (
        (
            torch.nn.functional,
            (
                "max_pool1d",
                "max_pool2d",
                "max_pool3d",
                "max_pool1d_with_indices",
                "max_pool2d_with_indices",
                "max_pool3d_with_indices",
            ),
        ),
        (torch, ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices")),
        (torch._C._nn, ("max_pool2d_with_indices", "max_pool3d_with_indices")),
    )
    for name in names
    if hasattr(mod, name)
)


@torch.compiler.assume_constant_result
def _inductor_vmapped_max_pool(vmaps: bool) -> str:
    """Run by dynamo at trace time (never traced): the name of the max-pool op when the graph being
    compiled for inductor already holds one and its backward will be vmapped, else ``""``.

    torch 2.13's inductor (CPU) miscompiles a vmapped max-pool backward followed by a parameter
    that requires grad (the scatter_add of the batched max_pool2d_with_indices_backward runs after
    the fused kernel that reads its result: an all-zero gradient); see tests/test_inductor.py.
    Any failure to introspect dynamo reads as "not affected" (the test there notices).
    """
    try:
        from torch._C._functorch import TransformType
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if not vmaps and all(i.key() != TransformType.Vmap for i in retrieve_all_functorch_interpreters()):
            return ""
        out = InstructionTranslator.current_tx().output
        backend = getattr(out.compiler_fn, "_torchdynamo_orig_backend", out.compiler_fn)
        if not (
            isinstance(backend, torch._TorchCompileInductorWrapper)
            or getattr(backend, "compiler_name", None) == "inductor"
        ):
            return ""
        for node in out.graph.nodes:
            if node.op == "call_function" and any(node.target is t for t in _MAX_POOLS):
                return "max_pool"
    except Exception:  # noqa: BLE001 - introspection of torch internals; never block a compile on it
        return ""
    return ""


def _check_compiled(vmaps: bool) -> None:
    """Trace-time guard against a silent upstream miscompilation (no-op in eager mode)."""
    if not torch.is_grad_enabled():  # an inference graph compiles correctly
        return
    if _inductor_vmapped_max_pool(vmaps):
        raise MiscompileError(
            "torch.compile with the default backend (inductor) silently returns an all-zero gradient "
            "through a max pool under vmap when parameters downstream of it require grad (a torch 2.13 bug: the "
            "scatter_add of the batched max-pool backward is scheduled after its reader). Compile with "
            'backend="aot_eager", call under torch.no_grad() (or with parameters that do not require '
            "grad), or call without vmap."
        )


def _norm(key) -> Key:
    return key if isinstance(key, tuple) else (key,)


def _show(key: Key) -> str:
    return repr(key[0]) if len(key) == 1 else repr(key)


def _show_all(keys: list[Key]) -> str:
    return "[" + ", ".join(_show(k) for k in keys) + "]"


@dataclass
class Inputs:
    keys: list[Key]
    x: dict  # key -> tensor
    baseline: dict  # key -> tensor broadcast to x's shape
    batch: torch.Size


_NO_F = object()
NONFINITE_FIX = "replace them (e.g. torch.nan_to_num) or drop those examples before attributing"


def prepare(
    td: TensorDictBase,
    in_keys: Sequence | None,
    *,
    baselines: bool = True,
    f: object = _NO_F,
    allow_inf: bool = False,
    baselines_arg: object = None,
    integer_inputs: bool = False,
) -> Inputs:
    """Validate ``f`` (when given), ``td`` and the attributed keys; collect inputs and baselines.

    Inputs and baselines must be finite (NaN is never accepted; ``allow_inf`` lets infinite inputs
    through, for a method that defines their attribution); the check is skipped inside transforms.
    ``baselines_arg``: a method's ``baselines=`` argument (see :func:`shared_baseline`), used instead of
    ``("baseline", key)`` entries.  ``integer_inputs``: integer / bool inputs are accepted (perturbation
    methods: token ids, masks); the default entries to attribute stay the floating-point ones.
    """
    if f is not _NO_F:
        check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    if not isinstance(td, TensorDictBase):
        raise TdfuncTypeError(
            f"td must be a TensorDict holding the inputs, got {type(td).__name__}; "
            "e.g. TensorDict({'x': x}, batch_size=[len(x)])."
        )
    leaves = [_norm(k) for k in td.keys(include_nested=True, leaves_only=True)]
    if in_keys is None:
        keys = [k for k in leaves if k[0] != BASELINE and td.get(k).is_floating_point()]
        if not keys:
            raise AttributionError(
                f"td has no floating-point entry to attribute (entries: {_show_all(leaves)}); "
                "store the inputs as float tensors or name them with in_keys=[...]."
            )
    else:
        if isinstance(in_keys, (str, tuple)):
            in_keys = [in_keys]
        keys = [_norm(k) for k in in_keys]
        for k in keys:
            if k[0] == BASELINE and len(k) > 1:
                raise AttributionError(
                    f"in_keys names {_show(k)}, the baseline of {_show(k[1:])}, as an input; baselines are "
                    f"not attributed. Name the input itself (in_keys=[{_show(k[1:])}]) and keep {_show(k)} as its "
                    "baseline."
                )
    x, base = {}, {}
    given = shared_baselines(baselines_arg, keys) if baselines else None
    for k in keys:
        if k not in leaves:
            near = suggest(".".join(k), {".".join(c): c for c in leaves})
            if near:  # show suggestions as keys, not dotted names
                near = (
                    " Did you mean "
                    + ", ".join(
                        _show(tuple(n.split(".")))
                        for n in near[len(" Did you mean ") : -1].replace("'", "").split(", ")
                    )
                    + "?"
                )
            raise AttributionError(
                f"unknown input key {_show(k)}: td has no such entry.{near} Entries: {_show_all(leaves)}."
            )
        v = td.get(k)
        if integer_inputs and v.is_complex():
            raise AttributionError(
                f"input {_show(k)} has dtype {v.dtype}; this method perturbs real inputs (floating-point, "
                "integer or bool). Attribute the real and imaginary parts as two real entries."
            )
        if not v.is_floating_point() and not integer_inputs:
            raise AttributionError(
                f"input {_show(k)} has dtype {v.dtype}; gradients need a floating-point input. "
                "Attribute a float tensor (e.g. embeddings instead of token ids: pass inputs_embeds)."
            )
        _finite_input(f"input {_show(k)}", v, allow_inf)
        x[k] = v
        if not baselines:
            continue
        bkey = (BASELINE, *k)
        b = td.get(bkey) if bkey in leaves else None
        if given is not None:
            if b is not None:
                raise AttributionError(
                    f"the baseline for {_show(k)} is given twice, as baselines= and as the td entry {bkey!r}; "
                    "keep one of them."
                )
            base[k] = shared_baseline(k, given[k], v)
            continue
        if b is None:
            base[k] = torch.zeros_like(v)
            continue
        _same_dtype_device(k, b, v, "the input")
        _finite_input(f"baseline {_show(bkey)}", b, allow_inf)
        try:
            base[k] = b.expand(v.shape) if b.shape != v.shape else b
        except RuntimeError:
            raise AttributionError(
                f"baseline for {_show(k)} has shape {shape_str(b.shape)} but the input has shape "
                f"{shape_str(v.shape)}; give a baseline broadcastable to the input."
            ) from None
    if baselines:
        inputs = [k for k in leaves if k[0] != BASELINE]
        for b in (k[1:] for k in leaves if k[0] == BASELINE and len(k) > 1):
            if b not in inputs:
                raise AttributionError(
                    f"td holds the baseline {(BASELINE, *b)!r} but no input {_show(b)} (inputs: "
                    f"{_show_all(inputs)}); store a baseline as ('baseline', key) for an input entry key, or remove it."
                )
    return Inputs(keys, x, base, td.batch_size)


def _same_dtype_device(k: Key, b: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """A baseline tensor ``b`` (td entry or ``baselines=``) must have the dtype and device of ``v`` (``what``)."""
    if b.device != v.device or b.dtype != v.dtype:
        raise AttributionError(
            f"baseline for {_show(k)} has dtype {b.dtype} on {b.device} but {what} has dtype "
            f"{v.dtype} on {v.device}; convert it with .to(input)."
        )


def shared_baselines(baselines: object, keys: list) -> dict | None:
    """A method's ``baselines=`` argument as key -> value (None when not given; see :func:`shared_baseline`)."""
    if baselines is None:
        return None
    return per_input(
        "baselines", baselines, keys, "baseline (a number or a tensor broadcastable to the input)", AttributionError
    )


def shared_baseline(k: Key, b: object, v: torch.Tensor, what: str = "the input") -> torch.Tensor:
    """One baseline shared across the batch, broadcast to the input ``v`` as captum does.

    A Python number (a tensor of ``v``'s dtype filled with it), or a tensor of ``v``'s dtype broadcastable to
    ``v``: ``()``, the feature shape ``(F,)``, ``(1, F)``, or ``v``'s shape (torch's broadcasting rule).
    ``what`` names ``v`` in messages (a layer method: "the site's value").
    """
    if isinstance(b, (int, float)):
        fits = v.is_floating_point() or (float(b) in (0.0, 1.0) if v.dtype == torch.bool else float(b).is_integer())
        if not fits or not math.isfinite(b):
            raise AttributionError(
                f"baseline for {_show(k)} is {b!r} but {what} has dtype {v.dtype}; give a finite value of "
                f"{what}'s dtype (for token ids an integer, e.g. the pad token id; for a bool mask True or False)."
            )
        return torch.full((), b, dtype=v.dtype, device=v.device).expand(v.shape)
    if not isinstance(b, torch.Tensor):
        raise AttributionError(
            f"baseline for {_show(k)} must be a number or a tensor broadcastable to {what} "
            f"{shape_str(v.shape)}, got {type(b).__name__}."
        )
    _same_dtype_device(k, b, v, what)
    _finite_input(f"baseline for {_show(k)}", b, False)
    if not broadcasts_to(b.shape, v.shape):
        raise AttributionError(
            f"baseline for {_show(k)} has shape {shape_str(b.shape)} but {what} has shape "
            f"{shape_str(v.shape)}; give a baseline broadcastable to {what}: a number, the feature shape "
            f"{shape_str(v.shape[1:]) if v.dim() else '()'}, (1, ...) or {what}'s shape."
        )
    return b.expand(v.shape)


def _finite_input(what: str, v: torch.Tensor, allow_inf: bool) -> None:
    if allow_inf and readable(v) and not bool(torch.isnan(v).any()):
        return
    check_finite(what, v, AttributionError, NONFINITE_FIX)


def check_rows_as_targets(k: int | None, batch: torch.Size, xs: dict, lead: int = 0) -> None:
    """An eager ``td`` with an empty batch size whose inputs all have ``k`` rows, where ``f`` returned ``(k,)``:
    the rows were meant as examples, not ``k`` targets of one example (inside transforms: not checked)."""
    if k is None or len(batch) or not xs or not all(readable(x) for x in xs.values()):
        return
    rows = {key: x.shape[lead:] for key, x in xs.items()}
    if all(len(s) >= 2 and s[0] == k for s in rows.values()):
        shapes = ", ".join(f"{_show(key)}: {shape_str(s)}" for key, s in rows.items())
        raise AttributionError(
            f"td has an empty batch size but f returned shape ({k},) and every input has {k} rows ({shapes}), "
            f"so the rows would be read as {k} targets of one example. Give td its batch size "
            f"(TensorDict({{...}}, batch_size=[{k}])); for one example with {k} targets, add a batch dim of 1 "
            "(x[None], batch_size=[1])."
        )


def tensor_output(f: Callable, batch: torch.Size) -> Callable:
    """``f`` with its output checked to be a tensor before a transform (vmap, vjp) sees it."""

    def checked(td: TensorDictBase) -> torch.Tensor:
        y = f(td)
        if not isinstance(y, torch.Tensor):
            raise AttributionError(
                f"f must return a tensor of shape batch {shape_str(batch)} or batch + (K,), got {type(y).__name__}."
            )
        return y

    return checked


def with_inputs(td: TensorDictBase, xs: dict) -> TensorDictBase:
    """A shallow copy of ``td`` with the attributed entries replaced (``td`` itself is untouched)."""
    out = td.clone(False)
    for k, v in xs.items():
        out.set(k, v)
    return out


def check_output(y: object, batch: torch.Size, xs: dict | None = None, *, batch_value: bool = False) -> int | None:
    """Number of targets K from ``f``'s output shape, or None for one target per example.

    ``xs`` (the attributed inputs): also refuse an empty batch size whose rows look like examples.
    ``batch_value``: also accept one value for the whole batch (shape ``()``; None is returned).
    """
    if not isinstance(y, torch.Tensor):
        raise AttributionError(
            f"f must return a tensor of shape batch {shape_str(batch)} or batch + (K,), got {type(y).__name__}."
        )
    n = len(batch)
    if batch_value and y.dim() == 0:
        return None
    if tuple(y.shape[:n]) == tuple(batch) and y.dim() in (n, n + 1):
        k = None if y.dim() == n else int(y.shape[-1])
        if xs is not None:
            check_rows_as_targets(k, batch, xs)
        return k
    raise AttributionError(
        f"f returned shape {shape_str(y.shape)}, but td has batch shape {shape_str(batch)}; f must return "
        f"one value per example {shape_str(batch)} or K per example ({''.join(f'{int(n)}, ' for n in batch)}K). "
        "Select the target inside f, e.g. lambda td: model(td['x']).gather(-1, labels[:, None])[:, 0]."
    )


def check_float_output(y: object) -> Any:
    """``y`` itself; a pinned error when ``f`` returned an integer / bool tensor (no gradient can flow)."""
    if isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex()):
        raise AttributionError(
            f"f returned a tensor of dtype {y.dtype}; gradients need a floating-point output (a logit, a "
            "probability, a loss). Return a float tensor (e.g. the logits, not logits.argmax(-1)), or cast it "
            "with .float() if its values are meant."
        )
    return y


def grads_per_target(
    g: Callable, xs: dict, lead: int, batch: torch.Size, reduce: Callable | None = None
) -> tuple[torch.Tensor, dict, int | None]:
    """One forward ``y = g(xs)``, then one vector-Jacobian product per target.

    ``g``'s output has ``lead`` extra leading dims (e.g. path steps) before ``batch (+ K)``.
    Returns ``(y, grads, K)`` with ``grads[key]`` of shape ``(K,) + xs[key].shape`` (no K dim when
    there is one target per example).  The K products reuse the one forward: sequential on the
    CPU, one vmapped product on accelerators (measured in bench/: on the CPU the vmapped product
    was ~3.5x slower).  ``reduce(key, grad)`` is applied to each target's gradient before the K are
    stacked (IG sums over the path there, so K full path gradients never coexist).
    """

    def floating(xs: dict) -> torch.Tensor:
        return check_float_output(g(xs))

    y, pull = vjp(floating, xs)  # type: ignore[misc]  # no has_aux: a pair
    if torch.compiler.is_compiling():
        _check_compiled(y.device.type != "cpu" if isinstance(y, torch.Tensor) else False)
    if not isinstance(y, torch.Tensor):
        check_output(y, batch)
    k = check_output(y[(0,) * lead] if lead else y, batch)
    check_rows_as_targets(k, batch, xs, lead)
    red = (lambda gs: gs) if reduce is None else (lambda gs: {key: reduce(key, v) for key, v in gs.items()})
    if k is None:
        return y, red(pull(torch.ones_like(y))[0]), None
    eye = torch.eye(k, dtype=y.dtype, device=y.device).view(k, *([1] * (y.dim() - 1)), k)
    cots = eye.expand(k, *y.shape)
    if y.device.type == "cpu":
        per = [red(pull(cots[i])[0]) for i in range(k)]
        grads = {key: torch.stack([p[key] for p in per]) for key in xs}
    else:
        grads = vmap(lambda c: red(pull(c)[0]))(cots)
    return y, grads, k


def input_gradients(g: Callable, td: TensorDictBase, p: Inputs) -> tuple[dict, int | None]:
    """Every target's gradient of ``g`` (a function of ``td``) at the inputs ``p.x``: key -> ``batch (+ K) +
    feature shape``, and K (one forward, K vjps: :func:`grads_per_target`)."""
    _, grads, k = grads_per_target(lambda xs: g(with_inputs(td, xs)), p.x, 0, p.batch)
    n = len(p.batch)
    return {key: move_target_dim(gr, k, n) for key, gr in grads.items()}, k


def result(batch: torch.Size, attrs: dict, extra: dict | None = None, *, warn: bool = False) -> TensorDict:
    """The result TensorDict; with ``warn``, a :class:`tdfunc.NonFiniteWarning` for a non-finite map."""
    out = TensorDict({}, batch_size=batch)
    for k, v in attrs.items():
        if warn:
            warn_nonfinite(repr(("attr", *k)), v)
        out.set(("attr", *k), v)
    for k, v in (extra or {}).items():
        out.set(k, v)
    return out


def move_target_dim(t: torch.Tensor, k: int | None, batch_dims: int) -> torch.Tensor:
    """(K, *batch, *feat) -> (*batch, K, *feat)."""
    return t if k is None else t.movedim(0, batch_dims)


def per_target(t: torch.Tensor, k: int | None, batch_dims: int) -> torch.Tensor:
    """Insert a size-1 target dim after the batch dims so an input broadcasts against (*batch, K, *feat)."""
    return t if k is None else t.unsqueeze(batch_dims)
