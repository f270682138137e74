"""DeepLift (rescale and reveal-cancel rules), DeepLiftShap and layer DeepLift as a pure rewrite of every activation
module's backward (the rules: ``_deep_lift_rules``, ``_reveal_cancel``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._call import _intervene as intervene
from .._checks import check_bool
from .._edits import rule
from .._errors import TdfuncTypeError, public, shape_str
from .._rewrite import record_then_rewrite
from .._types import InKeys
from ._common import (
    BASELINE,
    AttributionError,
    _show,
    grads_per_target,
    move_target_dim,
    per_target,
    prepare,
    result,
    tensor_output,
    with_inputs,
)
from ._deep_lift_rules import _module_sites, _refuse, _Rescale, _stashing

__all__ = ["deep_lift", "deep_lift_shap", "layer_deep_lift"]

#: DeepLift's rule at the activations
DeepLiftRule = Literal["rescale", "reveal_cancel"]


def _core(
    f: Callable,
    td: TensorDictBase,
    module: nn.Module,
    in_keys,
    multiply_by_inputs: bool,
    return_convergence_delta: bool,
    eps: float,
    baselines: dict | None = None,
    rule_name: str = "rescale",
) -> TensorDict:
    """DeepLift of ``f`` at ``td``; baselines from ``baselines`` (already of the inputs' shapes) or from ``td``."""
    if rule_name not in ("rescale", "reveal_cancel"):
        raise AttributionError(
            f"unknown rule {rule_name!r}; choose 'rescale' (captum's DeepLift) or 'reveal_cancel' (Shrikumar "
            "et al. 2017, §3.5.3: activations fed by an nn.Linear / nn.ConvNd)."
        )
    check_bool("multiply_by_inputs", multiply_by_inputs, AttributionError)
    check_bool("return_convergence_delta", return_convergence_delta, AttributionError)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise AttributionError(
            f"eps must be a non-negative float (input changes below it keep the plain gradient), got {eps!r}."
        )
    rescaled, refused = _module_sites(module)
    p = prepare(td, in_keys, f=f, baselines=baselines is None)
    base = p.baseline if baselines is None else baselines
    f = tensor_output(f, p.batch)
    nb = len(p.batch)
    one = nb == 0  # an unbatched td runs as a batch of one
    td1 = td.unsqueeze(0) if one else td
    x1 = {k: v.unsqueeze(0) for k, v in p.x.items()} if one else p.x
    b1 = {k: v.unsqueeze(0) for k, v in base.items()} if one else base
    rows = td1.batch_size[0]

    def paired(xs: dict) -> TensorDictBase:  # inputs, then their baselines, in one batch
        return torch.cat([with_inputs(td1, xs), with_inputs(td1, b1)], 0)  # type: ignore[return-value]  # TensorDicts cat to one

    stash: dict = {}
    one_pass = not torch.is_grad_enabled()  # record_then_rewrite's choice: one forward under no_grad
    sites: dict
    if rule_name == "reveal_cancel":
        from ._reveal_cancel import RevealCancel, reveal_cancel_edits

        edits: dict = reveal_cancel_edits(module, rescaled, stash)
        sites = {s: RevealCancel(s, module, stash, rows, float(eps), one_pass) for s in rescaled}
    else:
        edits = {f"{s}:input": _stashing(stash, s) for s in rescaled}
        sites = {s: _Rescale(s, stash, rows, float(eps), one_pass) for s in rescaled}
    edits.update({s: rule(_refuse(s, why)) for s, why in refused.items()})
    f_paired = intervene(f, module, edits=edits, strict=False) if edits else f
    rewritten = record_then_rewrite(f_paired, module, sites, (paired(x1),))

    def halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.dim() == 0 or y.shape[0] != 2 * rows:
            raise AttributionError(
                f"f returned shape {shape_str(y.shape)} for a td of batch shape "
                f"{shape_str(torch.Size([2 * rows, *td1.batch_size[1:]]))} (the inputs, then their baselines); f must "
                "return one value per example, or K per example, and take per-example data (labels) from td, not "
                "from its closure."
            )
        return y[:rows], y[rows:]

    def g(xs: dict) -> torch.Tensor:
        y = halves(rewritten(paired({k: v.unsqueeze(0) for k, v in xs.items()} if one else xs)))[0]
        return y[0] if one else y

    _, grads, k = grads_per_target(g, p.x, 0, p.batch)
    attrs = {}
    for key, gr in grads.items():
        gr = move_target_dim(gr, k, nb)
        attrs[key] = gr * per_target(p.x[key] - base[key], k, nb) if multiply_by_inputs else gr
    extra = {}
    if return_convergence_delta:
        at_x, at_base = halves(f(paired(x1)))
        if one:
            at_x, at_base = at_x[0], at_base[0]
        lead = nb + (k is not None)
        summed = sum(a.reshape(*a.shape[:lead], -1).sum(-1) for a in attrs.values())
        extra["convergence_delta"] = summed - (at_x - at_base)
    return result(td.batch_size, attrs, extra, warn=True)


@public("tdfunc.deep_lift")
def deep_lift(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    *,
    in_keys: InKeys | None = None,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    eps: float = 1e-10,
    rule: DeepLiftRule = "rescale",
) -> TensorDict:
    """DeepLift with the rescale rule (Shrikumar et al., 2017): the gradient with every activation's
    derivative replaced by its finite-difference multiplier between the input and the baseline.

    .. math::  \\mathrm{DL}_{b,k}(x) = (x_b - x'_b) \\odot \\frac{\\partial^{\\mathrm{DL}} f_k}{\\partial x_b},
        \\quad \\text{at each activation } y = \\sigma(z):\\ \\ g_z = g_y\\,
        \\frac{\\sigma(z) - \\sigma(z')}{z - z'} \\ \\ (\\text{plain } \\sigma'(z) \\text{ where } |z - z'| < \\epsilon)

    ``z'`` is the activation's input when ``f`` runs on the baseline.  For a network of linear layers
    and elementwise activations the multipliers chain exactly, so the attributions sum to
    ``f(x) - f(x')`` (completeness; ``return_convergence_delta`` reports the gap).  The rule is
    applied to every elementwise activation *module* of ``module`` (``nn.ReLU``, ``nn.Tanh``,
    ``nn.Sigmoid``, ``nn.GELU``, ``nn.SiLU``, ``nn.ELU``, ``nn.LeakyReLU``, ``nn.Softplus``, ... ;
    captum's ``DeepLift`` covers ReLU, ELU, LeakyReLU, Sigmoid, Tanh and Softplus and leaves other
    activations on their plain gradient).  Linear layers, convolutions, average pooling and
    eval-mode BatchNorm keep their gradient (exact for affine maps).  Other nonlinear modules
    (softmax, max pooling, normalisations over features, attention, recurrent layers, train-mode
    BatchNorm) raise when ``f`` reaches them, never a silently different rule.

    ``f`` runs once on the inputs and their baselines stacked along the first batch dim (batch
    ``2B``: the inputs, then the baselines), and every activation pairs its rows by that dim; per-
    example data (labels) must come from ``td``, which is stacked the same way, not from ``f``'s
    closure.  The rewrite is a :func:`tdfunc.rule` per activation call, recorded in a first forward
    (as :func:`tdfunc.guided_backprop`): the multipliers are constants to the inner vector-Jacobian
    product but functions of the weights and inputs to outer derivatives, so the map's double
    backward is exact.

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module`` and must be deterministic (it runs twice) and batch-agnostic (it sees ``2B`` rows).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        module: the model whose activation modules are rewritten.  ``F.relu`` / ``torch.tanh`` calls
            inside ``forward`` are not modules and keep their plain gradient (as in captum): completeness
            then fails, which ``return_convergence_delta`` shows.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.
        multiply_by_inputs: multiply the modified gradient by ``x - x'`` (captum's default True).
        return_convergence_delta: also return ``"convergence_delta"``, shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))`` (one more forward).
        eps: input changes ``|z - z'|`` below it keep the activation's plain derivative (captum's 1e-10).
        rule: ``"rescale"`` (captum's ``DeepLift``) or ``"reveal_cancel"`` (§3.5.3 of the paper; captum has no
            equivalent): at each activation ``y = σ(z)`` fed by an ``nn.Linear`` / ``nn.ConvNd`` ``z = W u + b``,
            the change ``Δz`` is split into the positive and negative parts ``Δz⁺ = Σ_i [w_i Δu_i > 0] w_i Δu_i``
            and ``Δz⁻`` (the linear rule, §3.5.1; ``w_i / 2`` to each where ``Δu_i = 0``), each gets the
            multiplier ``Δy^± / Δz^±`` with ``Δy⁺ = ½(σ(z' + Δz⁺) - σ(z')) + ½(σ(z' + Δz⁻ + Δz⁺) - σ(z' + Δz⁻))``
            (``Δy⁻`` likewise), and the two flow back through their own weights: interacting positive and
            negative terms are no longer cancelled before the nonlinearity (the paper's ``min`` example).
            Completeness holds as for the rescale rule.  An activation whose input is not such a layer's
            output raises.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: ``f`` reaches a module the rule does not cover; an activation whose first
            dim is not the stacked batch; unknown key, non-float input, bad baseline, ``f`` output of
            the wrong shape; an unknown ``rule``, or under ``"reveal_cancel"`` an activation not fed by a
            linear layer.
        NotReachedError: ``f`` ran the activations differently in its two forwards.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])   # baseline: zeros
        >>> out = tdfunc.deep_lift(lambda t: net(t["x"]), td, net, return_convergence_delta=True)
        >>> out["attr", "x"].shape   # every class from one forward
        torch.Size([5, 4, 3])
        >>> bool(out["convergence_delta"].abs().max() < 1e-5)   # sum(attr) = f(x) - f(0)
        True
        >>> rc = tdfunc.deep_lift(lambda t: net(t["x"]), td, net, rule="reveal_cancel", return_convergence_delta=True)
        >>> bool(rc["convergence_delta"].abs().max() < 1e-5)   # the reveal-cancel rule is complete too
        True

    References:
        Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating Activation
        Differences. ICML 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: exact),
    ``torch.compile(fullgraph=True)``.
    """
    return _core(f, td, module, in_keys, multiply_by_inputs, return_convergence_delta, eps, rule_name=rule)


def check_baseline_distribution(baselines: object, p_keys: list, xs: dict, nb: int) -> dict:
    """``baselines``: a TensorDict of batch ``(N,)`` holding, per attributed key, ``N`` baselines of the
    input's feature shape.  Returns key -> tensor ``(N, *feature shape)``."""
    if not isinstance(baselines, TensorDictBase) or len(baselines.batch_size) != 1 or baselines.batch_size[0] < 1:
        got = (
            f"a TensorDict of batch shape {shape_str(baselines.batch_size)}"
            if isinstance(baselines, TensorDictBase)
            else f"{type(baselines).__name__} ({baselines!r:.60})"
        )
        raise AttributionError(
            f"baselines must be a TensorDict of batch shape (N,) with N >= 1 baselines per attributed input, "
            f"got {got}; e.g. TensorDict({{'x': refs}}, batch_size=[len(refs)])."
        )
    out = {}
    for key in p_keys:
        x = xs[key]
        if key not in baselines.keys(include_nested=True, leaves_only=True):
            raise AttributionError(f"baselines has no entry {_show(key)}; give N baselines for every attributed input.")
        b = baselines.get(key)
        feat = x.shape[nb:]
        if b.shape[1:] != feat:
            raise AttributionError(
                f"baselines for {_show(key)} have shape {shape_str(b.shape)}, expected (N, *feature shape) = "
                f"{shape_str(torch.Size([baselines.batch_size[0], *feat]))} for an input of shape {shape_str(x.shape)}."
            )
        if b.dtype != x.dtype or b.device != x.device:
            raise AttributionError(
                f"baselines for {_show(key)} have dtype {b.dtype} on {b.device} but the input has dtype "
                f"{x.dtype} on {x.device}; convert them with .to(input)."
            )
        out[key] = b
    return out


@public("tdfunc.deep_lift_shap")
def deep_lift_shap(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    baselines: TensorDictBase,
    *,
    in_keys: InKeys | None = None,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    eps: float = 1e-10,
    rule: DeepLiftRule = "rescale",
) -> TensorDict:
    """DeepLiftShap (Lundberg & Lee, 2017): :func:`deep_lift` averaged over a distribution of baselines.

    .. math::  \\mathrm{DLS}_{b,k}(x) = \\frac{1}{N} \\sum_{j=1}^{N} \\mathrm{DL}_{b,k}(x;\\, x'_j)

    Every example is paired with each of the ``N`` baselines and the ``2 N B`` rows run as one batch
    (the inputs repeated ``N`` times, then the baselines), as captum's ``DeepLiftShap`` does.

    Args:
        f, module, in_keys, multiply_by_inputs, eps, rule: as in :func:`deep_lift`; ``f`` sees a td of
            batch ``(2 N B,)`` (a multi-dim batch is flattened), so per-example data must come from ``td``.
        td: the inputs; it must not hold ``("baseline", key)`` entries (the baselines come from ``baselines``).
        baselines: a TensorDict of batch shape ``(N,)`` with an entry per attributed input, of shape
            ``(N, *feature shape)`` (shared by every example).
        return_convergence_delta: also return ``"convergence_delta"``, shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - mean_j f(x'_j))``, the mean of the N DeepLift gaps.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape``.

    Raises:
        AttributionError: as :func:`deep_lift`; ``baselines`` not a TensorDict of batch ``(N,)``, missing
            a key, of the wrong feature shape, dtype or device; ``td`` holding baseline entries.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> refs = TensorDict({"x": torch.randn(10, 3)}, batch_size=[10])   # 10 baselines
        >>> tdfunc.deep_lift_shap(lambda t: net(t["x"]), td, net, refs)["attr", "x"].shape
        torch.Size([5, 4, 3])

    References:
        Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: exact),
    ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(td, TensorDictBase):
        raise TdfuncTypeError(
            f"td must be a TensorDict holding the inputs, got {type(td).__name__}; "
            "e.g. TensorDict({'x': x}, batch_size=[len(x)])."
        )
    held = [k for k in td.keys(include_nested=True, leaves_only=True) if isinstance(k, tuple) and k[0] == BASELINE]
    if held:
        raise AttributionError(
            f"td holds the baseline entry {held[0]!r}, but deep_lift_shap takes its baselines from the "
            "baselines TensorDict (N per input); remove the entry from td."
        )
    p = prepare(td, in_keys, f=f, baselines=False)
    nb = len(p.batch)
    refs = check_baseline_distribution(baselines, p.keys, p.x, nb)
    n, numel = baselines.batch_size[0], p.batch.numel()
    # (N, *batch) pairs of (example, baseline), flattened to one batch dim
    flat = td.expand(n, *p.batch).reshape(n * numel)
    bases = {
        k: b.view(n, *([1] * nb), *b.shape[1:]).expand(n, *p.x[k].shape).reshape(n * numel, *b.shape[1:])
        for k, b in refs.items()
    }
    out = _core(
        f, flat, module, p.keys, multiply_by_inputs, return_convergence_delta, eps, baselines=bases, rule_name=rule
    )

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, *p.batch, *t.shape[1:]).mean(0)

    attrs = {k: mean(out.get(("attr", *k))) for k in p.keys}
    extra = {"convergence_delta": mean(out.get("convergence_delta"))} if return_convergence_delta else {}
    return result(td.batch_size, attrs, extra, warn=True)


@public("tdfunc.layer_deep_lift")
def layer_deep_lift(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    site: str,
    *,
    in_keys: InKeys | None = None,
    multiply_by_inputs: bool = True,
    return_convergence_delta: bool = False,
    eps: float = 1e-10,
) -> TensorDict:
    """DeepLift at a site (captum's ``LayerDeepLift``): the site's change from the baseline run times
    DeepLift's multiplier of the output with respect to the site.

    .. math::  \\mathrm{LDL}_{b,k} = (a_b - a'_b) \\odot \\frac{\\partial^{\\mathrm{DL}} f_k}{\\partial a_b}

    with ``a`` / ``a'`` the site's values when ``f`` runs on the inputs / their baselines and the
    modified gradient of :func:`tdfunc.deep_lift` (every elementwise activation module rewritten
    with the rescale rule), taken through a zero delta at the site.  An output site (``"relu"``)
    gets the multiplier of what comes after the module; an input site (``"relu:input"``, captum's
    ``attribute_to_layer_input=True``) also goes through the module's own rule.  For a ReLU / linear
    network the site's attributions sum to ``f(x) - f(x')`` when the site cuts every path.

    Args:
        f, module, in_keys, multiply_by_inputs, eps: as in :func:`tdfunc.deep_lift` (``f`` sees the
            inputs and their baselines stacked: ``2B`` rows).
        td: the inputs; baselines are ``("baseline", key)`` entries (zeros when absent).
        site: a site of ``module`` whose value is batch-first (``"layer2"``, ``"relu:input"``, a ``Tap``).
        return_convergence_delta: also return ``"convergence_delta"``, shape ``batch (+ K)``:
            ``sum(attr) - (f(x) - f(x'))``.

    Returns:
        TensorDict with ``("attr", site)`` of shape ``batch (+ K) + the site's per-example shape``.

    Raises:
        As :func:`tdfunc.deep_lift`, and ``SiteError`` / ``NotReachedError`` for a bad site,
        AttributionError for a site value that is not a float tensor with the stacked rows first.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.layer_deep_lift(lambda t: net(t["x"]), td, net, "1", return_convergence_delta=True)
        >>> out["attr", "1"].shape, bool(out["convergence_delta"].abs().max() < 1e-5)
        (torch.Size([5, 4, 8]), True)

    References:
        Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating Activation
        Differences. ICML 2017.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward: exact),
    ``torch.compile(fullgraph=True)`` after ``tdfunc.install_sites(module, site)``.
    """
    from ._layer import _check, _run

    check_bool("multiply_by_inputs", multiply_by_inputs, AttributionError)
    check_bool("return_convergence_delta", return_convergence_delta, AttributionError)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise AttributionError(
            f"eps must be a non-negative float (input changes below it keep the plain gradient), got {eps!r}."
        )
    _check(td, module, site)
    rescaled, refused = _module_sites(module)
    p = prepare(td, in_keys, f=f)
    f = tensor_output(f, p.batch)
    nb = len(p.batch)
    one = nb == 0
    td1 = td.unsqueeze(0) if one else td
    x1 = {k: v.unsqueeze(0) for k, v in p.x.items()} if one else p.x
    b1 = {k: v.unsqueeze(0) for k, v in p.baseline.items()} if one else p.baseline
    rows = td1.batch_size[0]
    pair: TensorDictBase = torch.cat([with_inputs(td1, x1), with_inputs(td1, b1)], 0)  # type: ignore[assignment]  # TensorDicts cat to one

    y, caps = _run(f, module, pair, None, [site])
    a = caps[site]
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dim() == 0 or a.shape[0] != 2 * rows:
        what = (
            f"shape {shape_str(a.shape)}, dtype {a.dtype}"
            if isinstance(a, torch.Tensor)
            else f"a value of type {type(a).__name__}"
        )
        raise AttributionError(
            f"the value at site {site!r} has {what}; layer DeepLift needs a floating-point tensor whose first "
            f"dim is the {2 * rows} stacked rows (the inputs, then their baselines). Attribute another site."
        )
    holder = {"d": torch.zeros_like(a)}
    add = lambda v: v + holder["d"]  # noqa: E731  the zero delta the gradient is taken through
    at_input = ":input" in site
    inner = intervene(f, module, edits={site: add}) if at_input else f  # before the activation's input is kept
    stash: dict = {}
    edits: dict = {f"{s}:input": _stashing(stash, s) for s in rescaled}
    edits.update({s: rule(_refuse(s, why)) for s, why in refused.items()})
    f_paired = intervene(inner, module, edits=edits, strict=False) if edits else inner
    one_pass = not torch.is_grad_enabled()
    sites = {s: _Rescale(s, stash, rows, float(eps), one_pass) for s in rescaled}
    rewritten = record_then_rewrite(f_paired, module, sites, (pair,))
    outer = rewritten if at_input else intervene(rewritten, module, edits={site: add})  # after the rewrite

    def g(xs: dict) -> torch.Tensor:
        holder["d"] = xs["d"]
        out = outer(pair)
        return out[:rows]

    _, grads, k = grads_per_target(g, {"d": torch.zeros_like(a)}, 0, td1.batch_size)
    holder["d"] = torch.zeros_like(a)  # drop the traced delta
    gr = grads["d"]
    gr = gr[:rows] if k is None else gr[:, :rows]
    nb1 = len(td1.batch_size)
    gr = move_target_dim(gr, k, nb1)
    attr = gr * per_target(a[:rows] - a[rows:], k, nb1) if multiply_by_inputs else gr
    extra = {}
    if return_convergence_delta:
        lead = nb1 + (k is not None)
        extra["convergence_delta"] = attr.reshape(*attr.shape[:lead], -1).sum(-1) - (y[:rows] - y[rows:])
    if one:
        attr = attr[0]
        extra = {key: v[0] for key, v in extra.items()}
    out = TensorDict({}, batch_size=td.batch_size)
    out.set(("attr", site), attr)
    for key, v in extra.items():
        out.set(key, v)
    return out
