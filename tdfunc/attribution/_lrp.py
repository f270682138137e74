"""``tdfunc.lrp``: layer-wise relevance propagation as input × the gradient of a rewritten model.

The rules (``_lrp_rules``: the protocol; ``_lrp_linear``, ``_lrp_attention``) rewrite module outputs in
value-preserving ways; ``_lrp_assign`` picks each submodule's rule; :mod:`tdfunc._rewrite` runs the two
passes (record, then rewrite) or, under ``torch.no_grad()``, one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import vjp

from .._checks import check_callable
from .._edits import delta
from .._errors import NotReachedError, TdfuncTypeError, here, public
from .._finite import check_finite, readable
from .._rewrite import Rewrite, record_then_rewrite
from .._types import InKeys
from ._common import (
    NONFINITE_FIX,
    AttributionError,
    _norm,
    _show,
    check_float_output,
    check_output,
    check_rows_as_targets,
    grads_per_target,
    move_target_dim,
    per_target,
    prepare,
    result,
    with_inputs,
)
from ._layer import _activations, _check_sites, _outs, _run
from ._lrp_assign import plan
from ._lrp_composites import Composite, CompositeName
from ._lrp_rules import Rule
from ._lrp_watch import watched

__all__ = ["lrp"]


class _Site(Rewrite):
    """A rule at one site: ``tdfunc.lrp``'s checks of each call, and the site in a rule's error message."""

    def __init__(self, name: str, rule: Rule):
        self.name, self.rule = name, rule
        self.calls = 0  # records taken: 0 after f ran means f never called the module
        self.tape: list | None = None  # (inputs, rewritten output) per call, for check_conservation
        # rules with constant input modifiers (flat, w², zᴮ): relevance of zero inputs through a probe per call
        # (layer rules say whether they have such modifiers: ε, z⁺, αβ, γ have none, and no probe pass is taken)
        self.zero_terms = hasattr(rule, "zero_input_term") and getattr(rule, "constant_inputs", True)
        self.in_shapes: list = []  # (shape, dtype, device) of each recorded call's input
        self.probes: list | None = None  # this forward's probes, one per call
        self.inputs: list = []  # this forward's layer inputs, one per call

    def record(self, module, args, kwargs, out):
        self.calls += 1
        if any(isinstance(a, torch.Tensor) and a.is_nested for a in (*args, *kwargs.values())):
            raise AttributionError(
                f"tdfunc.lrp: module {self.name!r} received a nested tensor: nn.TransformerEncoder converts its input "
                "to one (its fast path) in eval mode when given a src_key_padding_mask and nothing requires grad; "
                "build the encoder with enable_nested_tensor=False."
            )
        if self.zero_terms:
            self.in_shapes.append((args[0].shape, args[0].dtype, args[0].device))
        try:
            return self.rule.record(module, args, kwargs, out)
        except AttributionError as e:
            raise AttributionError(f"tdfunc.lrp: {self.rule!r} at {self.name!r} ({_kind(module)}) {e}") from None

    def rewrite(self, module, args, kwargs, out, constants):
        new = self.rule.rewrite(module, args, kwargs, out, constants)
        probe = None
        if self.probes is not None:
            probe = self.probes[len(self.inputs)]
            self.inputs.append(args[0])
            extra = self.rule.zero_input_term(module, args, kwargs, out, constants, probe)
            new = new if extra is None else new + extra
        if self.tape is not None:
            self.tape.append(([a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)], new, probe))
        return new

    def recorded_output(self, out, constants):
        return self.rule.recorded_output(out, constants)


def _kind(module) -> str:
    """The module's type name, or the torch function's name at an operation site."""
    return type(module).__name__ if isinstance(module, nn.Module) else getattr(module, "__name__", "operation")


def _times(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x ⊙ g``, with 0 where ``x`` is infinite and ``g`` is 0 (a masked score; LXT's convention, not nan)."""
    return torch.where(torch.isinf(x) & (g == 0), torch.zeros_like(x), x) * g


@public("tdfunc.lrp")
def lrp(
    f: Callable[[TensorDictBase], torch.Tensor],
    td: TensorDictBase,
    module: nn.Module,
    *,
    rules: Mapping[str | type[nn.Module], Rule] | None = None,
    composite: CompositeName | Composite | None = "epsilon_plus",
    in_keys: InKeys | None = None,
    output_relevance: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    check_conservation: bool | tuple[float, float] = False,
    site: str | Sequence[str] | None = None,
) -> TensorDict:
    """Layer-wise relevance propagation (Bach et al., 2015) as input × a rule-modified gradient.

    .. math::  R_i = x_i\\, \\frac{\\partial^{\\mathrm{LRP}} f_k}{\\partial x_i},\\qquad
        \\text{at a layer } z = Wx + b:\\ \\ R_{\\mathrm{in}} = \\sum_t m_t(x) \\odot W_t^\\top
        \\Big(\\frac{c_t\\, R_{\\mathrm{out}}}{\\mathrm{stab}(\\mathrm{den}_t)}\\Big)

    The output relevance is ``f_k(x)`` itself (zennit with ``attr_output = output × one-hot``);
    for a bias-free ReLU network under LRP-0 / z⁺ the input relevance sums to it.  Every submodule
    of ``module`` gets a rule: the first ``rules`` entry whose site pattern matches its name, else
    the first whose module type it is an instance of (and that applies to it), else the
    composite's:

    * ``'epsilon'``: ε on every ``nn.Linear`` and convolution (``nn.ConvNd``, ``nn.ConvTransposeNd``);
    * ``'epsilon_plus'``: z⁺ on the convolutions, ε on ``nn.Linear`` (zennit's ``EpsilonPlus``);
    * ``'epsilon_plus_flat'``: also flat on the first layer (zennit's ``EpsilonPlusFlat``);
    * ``'epsilon_alpha2_beta1'`` (``'epsilon_alpha2_beta1_flat'``): αβ (α=2, β=1) on the convolutions, ε on
      ``nn.Linear`` (and flat on the first layer): zennit's ``EpsilonAlpha2Beta1`` (``...Flat``);
    * ``'excitation_backprop'``: z⁺ on every layer, activations on their gradient (zennit's ``ExcitationBackprop``);
    * ``'attnlrp'`` (transformers, Achtibat et al. 2024): ε on ``nn.Linear`` / convolutions,
      :func:`tdfunc.lrp_rules.attention` on ``nn.MultiheadAttention``, :func:`tdfunc.lrp_rules.softmax` on
      ``nn.Softmax``; on transformers models (eager attention): ε on ``Conv1D``, the norm rule on their
      RMSNorm modules, identity on their activation modules, and :func:`tdfunc.lrp_rules.uniform` at the
      operation sites ``"<attention>/matmul"`` (QKᵀ and A·V of every module with ``q_proj`` / ``k_proj`` /
      ``v_proj``, ``query`` / ``key`` / ``value`` or ``c_attn``) and ``"<mlp>/mul"`` (a gated MLP's
      ``act(gate) * up``).  Its first forward checks that every product and non-linearity of values that
      depend on the input has a rule, and names one that has none (an error, never a silent gradient;
      ``scaled_dot_product_attention``: load the model with ``attn_implementation="eager"``);
    * :func:`tdfunc.lrp_rules.epsilon_gamma_box` (``low``, ``high``): zennit's ``EpsilonGammaBox``;
    * ``None``: only the modules named in ``rules``.

    zennit's class names (``'EpsilonPlus'``, ``'EpsilonAlpha2Beta1Flat'``, ...) are accepted for its
    composites.  Every composite but ``'excitation_backprop'`` lets activations whose gradient is not
    already the identity (GELU, SiLU, Tanh, Sigmoid, Softplus, ReLU6, ...) and unmerged BatchNorm pass
    relevance unchanged (:func:`tdfunc.lrp_rules.passthrough`, zennit's ``Pass``), and gives
    ``nn.LayerNorm`` / ``nn.RMSNorm`` the LN rule (:func:`tdfunc.lrp_rules.norm`: ``1 / std`` held
    constant).  A submodule with parameters of its own that the composite has no rule for (a custom
    layer, ``nn.MultiheadAttention`` outside ``'attnlrp'``) is an error naming it, never silently left
    on its gradient: give it a rule (``tdfunc.lrp_rules.gradient()`` keeps the gradient on purpose).
    Parameter-free modules without a rule keep their gradient (ReLU, LeakyReLU, max-pooling, Dropout
    in eval, average pooling: zennit's ``Norm`` up to its stabilizer); so do residual sums, which are
    not modules: their plain gradient is the ``ε → 0`` limit of AttnLRP's ε rule for additions.  No
    canonizers: fold BatchNorm into the layer before it (:func:`tdfunc.lrp_rules.merge_batchnorm`).

    Each rule is a :func:`tdfunc.rule` rewrite keeping the module's value: ``f`` runs twice, first
    to record ``z`` and each rule's ratios ``r_t`` (outside the vector-Jacobian product), then with
    ``out = z - S + Σ_t r_t ⊙ W_t m_t(x)``.  So the relevance is exactly differentiable (e.g.
    ``‖R‖²`` in a loss: its gradient w.r.t. the weights includes ``∂r_t/∂θ``, which the usual
    ``.detach()`` trick drops).  Every target's map comes from one forward and K products.  Called
    under ``torch.no_grad()`` (where nothing can differentiate the result) ``f`` runs once, the
    constants taken from the same forward: equal values, one forward fewer (not with a flat, w² or zᴮ
    rule, whose zero-input probes need the first forward's shapes).

    Args:
        f: ``f(td) -> Tensor`` of shape ``td.batch_size`` or ``td.batch_size + (K,)``; it calls
            ``module``, must be deterministic (it runs twice).
        td: the inputs with a batch shape.
        module: the model whose submodules are rewritten.
        rules: ``{site pattern or nn.Module subclass: rule}`` from ``tdfunc.lrp_rules``: ``epsilon``,
            ``zplus``, ``alpha_beta``, ``gamma``, ``flat``, ``wsquare``, ``zbox`` (input layer) for
            ``nn.Linear`` and the convolutions; ``norm``, ``attention``, ``softmax``, ``identity`` /
            ``passthrough`` (elementwise modules), ``ignore`` and ``gradient`` (any module); or your own
            :class:`tdfunc.lrp_rules.Rule`.  Overrides the composite.  A key ``"path/op"`` is an operation
            site: every call of the torch operation ``op`` by the forward of the modules ``path`` matches
            (e.g. ``{"model.layers.*.self_attn/matmul": tdfunc.lrp_rules.uniform()}``; ``gradient()`` there
            keeps the operation's gradient on purpose).
        composite: ``'epsilon'``, ``'epsilon_plus'`` (default), ``'epsilon_plus_flat'``,
            ``'epsilon_alpha2_beta1'``, ``'epsilon_alpha2_beta1_flat'``, ``'excitation_backprop'``,
            ``'attnlrp'`` (``tdfunc.lrp_rules.COMPOSITES``) or zennit's class name for one, a
            :class:`tdfunc.lrp_rules.Composite` (e.g. :func:`tdfunc.lrp_rules.epsilon_gamma_box`), or ``None``.
        in_keys: entries to attribute; default every floating-point entry outside ``"baseline"``.
        output_relevance: the relevance to start from (zennit's ``attr_output``, tdhook's
            ``init_attr_grads``) instead of ``f_k(x)`` per target: a tensor of ``f``'s output shape, or
            a function of ``f``'s output returning one (e.g. ``lambda y: y * onehot``).  It is
            propagated as one map: the result has no target dim.  Where ``f``'s output is exactly 0 the
            relevance must be 0 (relevance is carried as value × gradient).
        check_conservation: ``True`` (or ``(atol, rtol)``, default ``(1e-6, 1e-6)``, as tdhook's
            ``raise_for_unconserved_rel``): after the attribution, check at every rewritten module
            call, per target and summed over the batch, that the relevance entering its inputs equals
            the relevance of its output, and raise naming the first module where it does not.
            Costs a forward and a backward per target more; skipped inside ``vmap`` / ``grad`` /
            ``torch.compile`` (values cannot be read there).  Modules left on their gradient are not
            checked.

    Returns:
        TensorDict with ``("attr", key)`` of shape ``batch (+ K) + feature shape`` (no K with
        ``output_relevance``); with ``site``, ``("attr", site)`` of shape ``batch (+ K) + the site's value
        shape`` per site (the site string is one key).  An input entry that
        is infinite where its gradient is 0 (a masked attention score) gets 0, not ``nan``.

    Raises:
        AttributionError: unknown composite, a submodule with its own parameters the composite has no
            rule for, a rule for a module type or site it does not apply to, a
            pattern matching nothing (or only an attention's ``out_proj``), bad rule parameters, an
            unsupported module configuration (in-place activation under the identity rule, attention
            with ``add_bias_kv`` / ``add_zero_attn`` or training-mode dropout, a transformer layer with a
            functional non-ReLU activation under ``'attnlrp'``, nested-tensor inputs); unknown key,
            non-float input, ``f`` output of the wrong shape.
        AttributionError (``check_conservation``): a module call whose input relevance differs from its
            output relevance, named with its rule and target.
        SiteError (``site``): unknown or malformed site; AttributionError: a glob site, ``site`` with
            ``in_keys`` / ``check_conservation`` / a flat, w² or zᴮ rule, a site value that is not batch-first.
        NotReachedError: ``f`` ran the rewritten modules differently in its two forwards, or never called
            ``module`` (none of its rewritten submodules ran).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> td = TensorDict({"x": torch.randn(5, 3)}, batch_size=[5])
        >>> out = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="epsilon")
        >>> out["attr", "x"].shape                      # every class, one call
        torch.Size([5, 4, 3])
        >>> at = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="epsilon", site=["0", "2:input"])
        >>> at["attr", "0"].shape                       # relevance at fc1's output (captum's LayerLRP)
        torch.Size([5, 4, 8])

    Zero inputs: relevance is carried as value × gradient, which cannot hold relevance at a value of
    exactly 0.  The flat, w² and zᴮ rules give such layer-input entries a share (their input modifier
    is a constant); that share is taken through a zero probe added to each such call (its gradient
    is the share, one more vector-Jacobian product per target) and pulled back to the attributed
    input by the gradient of the layer input (the identity when the layer reads the input, a reshape
    after ``Flatten``): equal to zennit's on [0, 1] pixel data with many zeros, and conservation holds.

    Limits: the identity / passthrough rule gives an input entry that is exactly 0 relevance 0 (zennit
    passes ``R_out`` there; for σ(0) = 0 activations both are 0).  Products of two tensors outside
    ``nn.MultiheadAttention`` and the attention / gated-MLP modules composite ``'attnlrp'`` recognises
    keep their plain gradient unless ``rules`` names them as operation sites (``{"path/matmul":
    tdfunc.lrp_rules.uniform()}``); ``'attnlrp'`` refuses them on models with modules outside ``torch.nn``.
    ``nn.TransformerEncoder`` in eval mode with a
    ``src_key_padding_mask`` converts its input to a nested tensor when nothing requires grad (its
    fast path): build it with ``enable_nested_tensor=False``.  ``nn.TransformerEncoderLayer``'s fused
    eval path (``torch._transformer_encoder_layer_fwd``), which skips its submodules, is not taken by
    a layer with a rewritten submodule (tdfunc's site hooks disable it); a layer without one may take
    it in the first forward only, where it changes no value.  Under ``vmap`` over examples, the
    attention module's own forward (still run, its output replaced) uses a CPU kernel without a
    batching rule: torch warns of a slow fallback.

    References:
        Bach, Binder, Montavon, Klauschen, Müller, Samek. On Pixel-Wise Explanations for Non-Linear
        Classifier Decisions by Layer-Wise Relevance Propagation. PLoS ONE 2015.
        Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin, Samek. AttnLRP: Attention-Aware
        Layer-Wise Relevance Propagation for Transformers. ICML 2024.
        Ali, Schnake, Eberle, Montavon, Müller, Wolf. XAI for Transformers: Better Explanations
        through Conservative Propagation. ICML 2022 (the LN rule, CP-LRP).
        Montavon, Binder, Lapuschkin, Samek, Müller. Layer-Wise Relevance Propagation: An Overview.
        2019.  Anders et al. Software for Dataset-wide XAI (zennit). 2021.

    Composes with: ``vmap`` (over examples or targets), ``grad`` (double backward, exact),
    ``torch.compile(fullgraph=True)`` after :func:`tdfunc.install_sites`.
    """
    at = None if site is None else _check_sites(td, module, site)
    if at is not None and in_keys is not None:
        raise AttributionError(
            f"in_keys={in_keys!r:.60} and site={site!r:.60} were both given; with site the relevance is "
            "taken at the site, not at inputs: drop in_keys."
        )
    assigned, coverage = plan(module, rules, composite)
    sites = {s: _Site(s, r) for s, r in assigned.items()}
    watch = None if coverage is None or torch.compiler.is_compiling() else watched(module, coverage)
    if at is None:
        p = prepare(td, in_keys, baselines=False, f=f, allow_inf=True)
    else:
        _site_inputs(f, td, site, sites, check_conservation)
    tol = _tolerance(check_conservation)
    # two forwards (constants recorded in the first); one under no_grad, where nothing can differentiate the result
    first: list = []
    zsites = [st for st in sites.values() if st.zero_terms]
    with torch.enable_grad() if zsites else contextlib.nullcontext():  # zero-input probes need the recorded shapes
        rewritten = record_then_rewrite(
            f, module, sites, (td,), first if output_relevance is not None else None, watch=watch
        )
    weight = None if output_relevance is None else _cotangent(output_relevance, first[0])
    if at is not None:  # the site's value x the rewritten gradient there (an additive zero delta at each site)
        return _at_sites(rewritten, td, module, at, weight, sites)
    g = lambda xs: rewritten(with_inputs(td, xs))  # noqa: E731
    if weight is not None:
        nb = len(p.batch)
        g = lambda xs: (rewritten(with_inputs(td, xs)) * weight).reshape(*p.batch, -1).sum(nb)  # noqa: E731
    zgrads: dict | None = None
    if zsites and any(st.in_shapes for st in zsites):
        grads, zgrads, k = _grads_with_zero_inputs(g, p.x, p.batch, zsites)
    else:
        _, grads, k = grads_per_target(g, p.x, 0, p.batch)
    _check_reached(module, sites)
    n = len(p.batch)
    attrs = {key: _times(per_target(p.x[key], k, n), move_target_dim(gr, k, n)) for key, gr in grads.items()}
    if zgrads is not None:  # + the relevance of zero layer inputs, pulled back by the gradient
        attrs = {key: a + move_target_dim(zgrads[key], k, n) for key, a in attrs.items()}
    if tol is not None and sites and readable(next(iter(p.x.values()), None)):
        _check_conservation(rewritten, td, p.x, sites, weight, k, tol)
    return result(td.batch_size, attrs, warn=True)


def _check_reached(module: nn.Module, sites: dict) -> None:
    if sites and not torch.compiler.is_compiling() and not any(s.calls for s in sites.values()):
        names = ", ".join(repr(s) for s in list(sites)[:3]) + (", ..." if len(sites) > 3 else "")
        raise NotReachedError(
            f"f never called module ({type(module).__name__}): none of its {len(sites)} rewritten submodules "
            f"({names}) ran, so the result would be plain input x gradient. f must call the module passed as "
            f"module (not a copy of it), e.g. {here()}(lambda t: model(t['x']), td, model)."
        )


def _site_inputs(f, td: TensorDictBase, site, sites: dict, check_conservation) -> None:
    """``lrp(..., site=...)``'s checks: ``f``, finite float inputs (any may be read), no zero-input rules."""
    check_callable("f", f, AttributionError, expected="f(td) -> Tensor")
    for key in td.keys(include_nested=True, leaves_only=True):
        if td.get(key).is_floating_point():
            check_finite(f"input {_show(_norm(key))}", td.get(key), AttributionError, NONFINITE_FIX)
    if check_conservation is not False:
        raise AttributionError(
            f"check_conservation={check_conservation!r:.40} with site={site!r:.60}: the check follows the "
            "relevance down to the inputs; run it on the input attribution (lrp without site)."
        )
    zero = [n for n, st in sites.items() if st.zero_terms]
    if zero:
        raise AttributionError(
            f"site={site!r:.60} with the rule {sites[zero[0]].rule!r} at {zero[0]!r}: flat, w² and zᴮ give "
            "zero layer inputs relevance through probes, which relevance at a site does not carry; use rules "
            "without constant input modifiers (epsilon, zplus, alpha_beta, gamma) there, or attribute the inputs."
        )


def _at_sites(rewritten, td: TensorDictBase, module: nn.Module, at: list, weight, sites: dict) -> TensorDict:
    """``("attr", site)``: each site's value x the gradient of the rewritten ``f`` there (a zero delta at every site;
    one forward for the values, one more + K vjps for the gradients)."""
    _, acts = _activations(rewritten, module, td, at)
    names = [f"d{i}" for i in range(len(at))]

    def g(ds: dict) -> torch.Tensor:
        y = _run(rewritten, module, td, {s: delta(ds[d]) for s, d in zip(at, names)}, None)
        return y if weight is None else (y * weight).reshape(*td.batch_size, -1).sum(len(td.batch_size))

    _, grads, k = grads_per_target(g, {d: torch.zeros_like(a) for d, a in zip(names, acts)}, 0, td.batch_size)
    _check_reached(module, sites)
    n = len(td.batch_size)
    return _outs(
        td,
        {s: _times(per_target(a, k, n), move_target_dim(grads[d], k, n)) for s, d, a in zip(at, names, acts)},
        warn=True,
    )


def _grads_with_zero_inputs(g, xs: dict, batch: torch.Size, zsites: list) -> tuple[dict, dict, int | None]:
    """Per target: the gradient ``g_x`` (as :func:`grads_per_target`) and, in a second dict, the relevance
    flat / w² / zᴮ give layer inputs that are exactly 0 (the gradient w.r.t. each call's zero probe ``P``),
    pulled back to the attributed inputs by the gradient of the layer input (zennit's relevance there)."""
    probes = [[torch.zeros(sh, dtype=dt, device=dv) for sh, dt, dv in st.in_shapes] for st in zsites]

    def h(xs, probes):
        for st, ps in zip(zsites, probes):
            st.probes, st.inputs = ps, []
        try:
            y = check_float_output(g(xs))
            return y, [u for st in zsites for u in st.inputs]
        finally:
            for st in zsites:
                st.probes, st.inputs = None, []

    (y, us), pull = vjp(h, xs, probes)  # type: ignore[misc]  # no has_aux: a pair
    k = check_output(y, batch)
    check_rows_as_targets(k, batch, xs)
    if len(us) != sum(len(ps) for ps in probes):
        raise NotReachedError(
            "f called the layers under flat / w² / zᴮ rules a different number of times than "
            "in its first forward; f must be deterministic."
        )
    zero_us = [torch.zeros_like(u) for u in us]

    def one(cot):
        gx, gp = pull((cot, zero_us))
        hx, _ = pull((torch.zeros_like(y), [t for ps in gp for t in ps]))
        return gx, hx

    if k is None:
        gx, hx = one(torch.ones_like(y))
        return gx, hx, None
    eye = torch.eye(k, dtype=y.dtype, device=y.device).view(k, *([1] * (y.dim() - 1)), k)
    per = [one(eye.expand(k, *y.shape)[i]) for i in range(k)]
    stack = lambda j: {key: torch.stack([q[j][key] for q in per]) for key in xs}  # noqa: E731
    return stack(0), stack(1), k


def _tolerance(check) -> tuple[float, float] | None:
    if check is False:
        return None
    if check is True:
        return (1e-6, 1e-6)
    if (
        isinstance(check, tuple)
        and len(check) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in check)
    ):
        return (float(check[0]), float(check[1]))
    raise AttributionError(
        f"check_conservation must be True, False or (atol, rtol) with two numbers >= 0, got {check!r:.80}."
    )


def _cotangent(rel, z) -> torch.Tensor:
    """``R / z`` for the output relevance ``R`` (0 where both are 0): the vector whose vjp propagates ``R``."""
    if not isinstance(z, torch.Tensor):
        raise AttributionError(f"output_relevance needs f to return a tensor, got {type(z).__name__}.")
    if callable(rel) and not isinstance(rel, torch.Tensor):
        rel = rel(z)
    if not isinstance(rel, torch.Tensor):
        raise TdfuncTypeError(
            f"output_relevance must be a tensor of f's output shape or a function of f's output returning "
            f"one, got {type(rel).__name__} ({rel!r:.60})."
        )
    if rel.shape != z.shape:
        raise AttributionError(
            f"output_relevance has shape {tuple(rel.shape)} but f returns shape {tuple(z.shape)}; give one "
            "relevance per output entry (e.g. output_relevance=lambda y: y * onehot)."
        )
    zero = z == 0
    if readable(rel) and readable(z) and bool((zero & (rel != 0)).any()):
        raise AttributionError(
            f"output_relevance is nonzero where f's output is exactly 0 ({int((zero & (rel != 0)).sum())} "
            "entries); relevance is carried as value x gradient, so an output of 0 cannot hold any. Give those "
            "entries relevance 0."
        )
    return torch.where(zero, torch.zeros_like(z), rel.to(z.dtype) / torch.where(zero, torch.ones_like(z), z))


def _check_conservation(rewritten, td, xs: dict, sites: dict, weight, k: int | None, tol) -> None:
    """Σ R_in = Σ R_out at every rewritten module call, per target (summed over the batch): one more forward."""
    atol, rtol = tol
    for s in sites.values():
        s.tape = []
        if s.zero_terms:  # zero inputs' share (flat, w², zᴮ) through probes, counted as input relevance
            s.probes = [torch.zeros(sh, dtype=dt, device=dv, requires_grad=True) for sh, dt, dv in s.in_shapes]
    try:
        with torch.enable_grad():
            leaves = {key: v.detach().requires_grad_(True) for key, v in xs.items()}
            y = rewritten(with_inputs(td, leaves))
            if weight is not None:
                y = y * weight.detach()
            targets = [y.sum()] if k is None else [y[..., j].sum() for j in range(k)]
            calls = [
                (n, i, ins, out, pr)
                for n, s in sites.items()
                for i, (ins, out, pr) in enumerate(s.tape or [])
                if isinstance(out, torch.Tensor) and out.requires_grad
            ]
            for j, total in enumerate(targets):
                gs = torch.autograd.grad(total, [c[3] for c in calls], retain_graph=True, allow_unused=True)
                for (name, i, ins, out, pr), g in zip(calls, gs):
                    if g is None:
                        continue
                    r_out = (out * g).sum()
                    ins = list({id(a): a for a in ins if a.requires_grad}.values())
                    gi = torch.autograd.grad(out, ins, g, retain_graph=True, allow_unused=True) if ins else ()
                    r_in = sum(((a * b).sum() for a, b in zip(ins, gi) if b is not None), torch.zeros_like(r_out))
                    if pr is not None:  # the probe's gradient is the zero inputs' relevance itself
                        (gp,) = torch.autograd.grad(out, pr, g, retain_graph=True, allow_unused=True)
                        r_in = r_in if gp is None else r_in + gp.sum()
                    if not bool(torch.isclose(r_in, r_out, atol=atol, rtol=rtol)):
                        rule = sites[name].rule
                        where = "" if k is None else f" for target {j}"
                        raise AttributionError(
                            f"relevance is not conserved at {name!r} (call {i + 1}, rule {rule!r}){where}: its "
                            f"inputs get {float(r_in.detach()):.6g} of the "
                            f"{float(r_out.detach()):.6g} its output holds (summed over the "
                            f"batch; atol={atol:g}, rtol={rtol:g}). A bias, ε, or a non-conservative rule absorbs "
                            "relevance there; pass check_conservation=(atol, rtol) to loosen the check."
                        )
    finally:
        for s in sites.values():
            s.tape, s.probes, s.inputs = None, None, []
