"""Canonizers for LRP as pure functions of the state: BatchNorm merged into the preceding layer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._errors import StateError, TdfuncTypeError, public, suggest
from .._state import state as _state
from ._common import AttributionError

__all__ = ["merge_batchnorm", "with_zero_biases"]

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FN = "tdfunc.lrp_rules.merge_batchnorm"


def _auto_pairs(module: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, parent in module.named_modules():
        kids = list(parent.named_children())
        for (na, a), (nb, b) in zip(kids, kids[1:]):
            if isinstance(a, _LINEAR) and isinstance(b, _BN):
                pairs.append((f"{prefix}.{na}" if prefix else na, f"{prefix}.{nb}" if prefix else nb))
    return pairs


def _get(module: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        raise AttributionError(
            f"{_FN}: {what} {name!r} names no submodule of {type(module).__name__}.{suggest(name, names)} "
            "Pass dotted module names as in model.named_modules(), e.g. pairs=[('features.0', 'features.1')]."
        ) from None


def _entry(td: TensorDictBase, name: str, leaf: str) -> torch.Tensor:
    key = (*name.split("."), leaf)
    t = td.get(key, None)
    return _missing(name, leaf) if t is None else t


def _missing(name: str, leaf: str):
    raise StateError(
        f"{_FN}: the state has no entry {name + '.' + leaf!r}; pass a full state (tdfunc.state(model)) "
        "or one that holds every tensor of the merged layers and BatchNorms."
    )


def _scaled(w: torch.Tensor, scale: torch.Tensor, nb: int, groups: int, transposed: bool) -> torch.Tensor:
    """``w`` with output channel ``o`` scaled by ``scale[..., o]`` (``nb`` leading state batch dims)."""
    if not transposed:
        return w * scale.reshape(scale.shape + (1,) * (w.dim() - scale.dim()))
    lead, c_in, per, k = w.shape[:nb], w.shape[nb], w.shape[nb + 1], w.shape[nb + 2 :]
    wg = w.reshape(*lead, groups, c_in // groups, per, *k)
    sg = scale.reshape(*lead, groups, 1, per, *([1] * len(k)))
    return (wg * sg).reshape(w.shape)


@public("tdfunc.lrp_rules.merge_batchnorm")
def merge_batchnorm(
    module: nn.Module,
    state: TensorDictBase | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> TensorDict:
    """A new state in which every eval-mode BatchNorm is folded into the linear / conv layer before it.

    The BatchNorm canonizer of LRP (zennit's ``SequentialMergeBatchNorm`` / ``MergeBatchNorm``), as
    a pure function of the state: for each pair (layer ``L`` with ``weight`` / ``bias``, BatchNorm
    ``B`` right after it), with ``s = γ / sqrt(var + eps)`` per output channel,

        w' = w · s,    b' = (b − mean) · s + β,    B ← (γ=1, β=0, mean=0, var=1−eps),

    so ``B`` computes the identity ``(x − 0) / sqrt(1 − eps + eps) = x`` and the model's eval-mode
    output is unchanged while LRP rules see the whole affine map in ``L``.  (zennit sets ``var=1``,
    leaving ``B`` a scaling by ``1/sqrt(1+eps)``; here ``B`` is exactly the identity.)  The result
    is differentiable in ``state`` and works on stacked states (leading batch dims) and under ``vmap``.

    Args:
        module: the model; must be in eval mode for the paired BatchNorms.
        state: the state to merge (default ``tdfunc.state(module)``); never modified.
        pairs: ``[(layer, batchnorm), ...]`` dotted module names; by default every
            ``Linear`` / ``ConvNd`` / ``ConvTransposeNd`` child immediately followed by a ``BatchNorm1d`` /
            ``BatchNorm2d`` / ``BatchNorm3d`` child of the same parent (``nn.Sequential`` order).

    Returns:
        A new TensorDict (same batch size as ``state``) sharing every untouched tensor with ``state``.

    Raises:
        AttributionError: a BatchNorm is in training mode or has ``track_running_stats=False``; a pair
            names a missing module, a non-BatchNorm second element or an unsupported first element;
            the layer has no bias (build it with ``bias=True``: a functional state cannot add a
            parameter); the layer's output channels differ from the BatchNorm's ``num_features``.
        StateError: ``state`` lacks a tensor of a merged layer or BatchNorm.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
        >>> net[1].running_mean.fill_(0.5); net[1].running_var.fill_(4.0)  # doctest: +ELLIPSIS
        tensor(...
        >>> s = tdfunc.lrp_rules.merge_batchnorm(net)
        >>> x = torch.randn(1, 1, 5, 5)
        >>> torch.allclose(tdfunc.functional_call(net, s, (x,)), net(x), atol=1e-6)
        True
        >>> s["1", "weight"].tolist(), s["1", "running_mean"].tolist()
        ([1.0, 1.0], [0.0, 0.0])

    References:
        Montavon et al., "Layer-Wise Relevance Propagation: An Overview" (2019), §10.2 (canonization);
        Anders et al., "Software for Dataset-wide XAI: From Local Explanations to Global Insights
        with Zennit, CoRelAy, and ViRelAy" (2021).

    Composes with: ``tdfunc.lrp`` (call ``functional_call(module, merged, ...)`` inside ``f``),
    ``torch.func.vmap`` over stacked states, ``torch.func.grad`` with respect to ``state``.
    """
    if not isinstance(module, nn.Module):
        raise TdfuncTypeError(f"{_FN}: expected an nn.Module, got {type(module).__name__} ({module!r:.60}).")
    if state is None:
        state = _state(module)
    if not isinstance(state, TensorDictBase):
        raise TdfuncTypeError(
            f"{_FN}: state must be a TensorDict (tdfunc.state(model)) or None, got {type(state).__name__}."
        )
    if pairs is None:
        pairs = _auto_pairs(module)
    else:
        pairs = [tuple(p) for p in pairs]  # type: ignore[misc]  # checked just below
        for p in pairs:
            if len(p) != 2 or not all(isinstance(n, str) for n in p):
                raise AttributionError(
                    f"{_FN}: each pair must be (layer name, batchnorm name), got {p!r}; "
                    "e.g. pairs=[('features.0', 'features.1')]."
                )
    nb = state.batch_dims
    out = state.clone(recurse=False)
    for lname, bname in pairs:
        lin, bn = _get(module, lname, "layer"), _get(module, bname, "batchnorm")
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise AttributionError(
                f"{_FN}: pair ({lname!r}, {bname!r}): {bname!r} is a {type(bn).__name__}, not a BatchNorm; "
                "the second name of each pair must be the BatchNorm that follows the layer."
            )
        if not isinstance(lin, _LINEAR):
            raise AttributionError(
                f"{_FN}: pair ({lname!r}, {bname!r}): {lname!r} is a {type(lin).__name__}; "
                "only nn.Linear, nn.ConvNd and nn.ConvTransposeNd layers can absorb a BatchNorm."
            )
        if bn.training:
            raise AttributionError(
                f"{_FN}: BatchNorm {bname!r} is in training mode, where it normalises with batch statistics "
                "and cannot be merged; call model.eval() first."
            )
        if not bn.track_running_stats:
            raise AttributionError(
                f"{_FN}: BatchNorm {bname!r} has track_running_stats=False and normalises with batch "
                f"statistics even in eval mode, so it cannot be merged into {lname!r}."
            )
        if lin.bias is None:
            raise AttributionError(
                f"{_FN}: layer {lname!r} has no bias, so it cannot absorb the BatchNorm's shift (a state "
                f"cannot add a parameter); merge into tdfunc.lrp_rules.with_zero_biases(model), a copy with zero "
                f"biases (the same function), and call that copy in f."
            )
        w, b = _entry(state, lname, "weight"), _entry(state, lname, "bias")
        mean, var = _entry(state, bname, "running_mean"), _entry(state, bname, "running_var")
        transposed = isinstance(lin, nn.modules.conv._ConvTransposeNd)
        groups = int(lin.groups) if transposed else 1  # type: ignore[arg-type]  # transposed: a conv
        # a transposed conv's weight is (in, out / groups, *k): its output channels are (group, dim nb + 1)
        c_out, c_bn = (w.shape[nb + 1] * groups if transposed else w.shape[nb]), mean.shape[nb]
        if c_out != c_bn:
            raise AttributionError(
                f"{_FN}: pair ({lname!r}, {bname!r}): the layer has {c_out} output channels but the "
                f"BatchNorm has {c_bn} features; pair each BatchNorm with the layer that feeds it."
            )
        if bn.affine:
            gamma, beta = _entry(state, bname, "weight"), _entry(state, bname, "bias")
        else:
            gamma, beta = torch.ones_like(mean), torch.zeros_like(mean)
        scale = gamma / (var + bn.eps) ** 0.5
        lkey, bkey = tuple(lname.split(".")), tuple(bname.split("."))
        out.set((*lkey, "weight"), _scaled(w, scale, nb, groups, transposed))
        out.set((*lkey, "bias"), (b - mean) * scale + beta)
        out.set((*bkey, "running_mean"), torch.zeros_like(mean))
        out.set((*bkey, "running_var"), torch.full_like(var, 1.0 - bn.eps))
        if bn.affine:
            out.set((*bkey, "weight"), torch.ones_like(gamma))
            out.set((*bkey, "bias"), torch.zeros_like(beta))
    return out


@public("tdfunc.lrp_rules.with_zero_biases")
def with_zero_biases(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every bias-free ``nn.Linear`` / convolution has a zero bias.

    The same function (a zero bias adds nothing), but a layer that can absorb a BatchNorm's shift:
    torchvision-style ResNets build their convolutions with ``bias=False`` before each BatchNorm, so
    ``tdfunc.lrp_rules.merge_batchnorm(tdfunc.lrp_rules.with_zero_biases(model))`` is the ResNet canonizer
    (zennit's ``ResNetCanonizer``: every conv / BatchNorm pair merged, the downsampling branch included;
    the residual sum keeps its gradient, zennit's ``Norm`` rule up to its stabilizer).  ``module`` is not
    changed: the copy (``copy.deepcopy``) is what ``f`` must call and what :func:`tdfunc.lrp` gets.

    Args:
        module: the model.

    Returns:
        A deep copy of ``module`` with ``bias`` parameters of zeros (the weight's dtype and device) added
        where a layer had none.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.BatchNorm2d(2)).eval()
        >>> net2 = tdfunc.lrp_rules.with_zero_biases(net)
        >>> s = tdfunc.lrp_rules.merge_batchnorm(net2)
        >>> x = torch.randn(1, 1, 5, 5)
        >>> torch.allclose(tdfunc.functional_call(net2, s, (x,)), net(x), atol=1e-6), net[0].bias is None
        (True, True)

    Composes with: :func:`tdfunc.lrp_rules.merge_batchnorm`, :func:`tdfunc.lrp`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"tdfunc.lrp_rules.with_zero_biases: expected an nn.Module, got {type(module).__name__} ({module!r:.60})."
        )
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, _LINEAR) and m.bias is None:
            n = m.weight.shape[1] * m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else m.weight.shape[0]
            m.bias = nn.Parameter(torch.zeros(n, dtype=m.weight.dtype, device=m.weight.device))
    return out
