"""Adapters whose parameters are TensorDict state: sparse autoencoders, transcoders, LoRA."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from .._checks import check_generator, check_int
from .._edits import FromSite, from_site
from .._errors import EditError, TdfuncTypeError, here, public, shape_str, suggest
from .._types import Key
from ._common import (
    TD,
    WeightError,
    check_scale,
    check_td,
    dotted,
    from_leaves,
    known_names,
    leaves,
    missing_entry,
    parse_key,
    rebuild,
)

__all__ = [
    "sae_init",
    "sae_encode",
    "sae_decode",
    "sae_edit",
    "transcoder_init",
    "transcoder_edit",
    "lora_init",
    "apply_lora",
]

_SAE_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _check_dims(generator: Any = None, **dims: Any) -> None:
    for name, v in dims.items():
        check_int(name, v, WeightError)
    check_generator(generator, WeightError)


def _init(d_in: int, d_hidden: int, d_out: int, generator, dtype, device) -> TensorDict:
    w_dec = torch.randn(d_hidden, d_out, generator=generator, dtype=dtype, device=device)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)  # unit-norm decoder directions
    if d_in == d_out:
        w_enc = w_dec.T.clone()  # tied initialisation (encoder = decoder transpose)
    else:
        w_enc = torch.randn(d_in, d_hidden, generator=generator, dtype=dtype, device=device) / math.sqrt(d_in)
    z = lambda n: torch.zeros(n, dtype=dtype, device=device)
    return TensorDict({"W_enc": w_enc, "b_enc": z(d_hidden), "W_dec": w_dec, "b_dec": z(d_out)}, batch_size=[])


@public("tdfunc.weights.sae_init")
def sae_init(
    d_in: int,
    d_hidden: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TensorDict:
    """Parameters of a ReLU sparse autoencoder as a TensorDict state.

    .. math::  f = \\mathrm{ReLU}(x W_{enc} + b_{enc}), \\qquad \\hat x = f W_{dec} + b_{dec}

    Decoder rows are random unit vectors, the encoder is their transpose, biases are zero.

    Args:
        d_in: width of the activation it reconstructs.
        d_hidden: number of features.
        generator: random generator for the initialisation.
        dtype: dtype of the parameters (default: torch's default float dtype).
        device: device of the parameters.

    Returns:
        TensorDict with ``"W_enc"`` (d_in, d_hidden), ``"b_enc"`` (d_hidden,), ``"W_dec"``
        (d_hidden, d_in), ``"b_dec"`` (d_in,); train it with ``torch.func.grad`` over it.

    Example:
        >>> import torch, tdfunc
        >>> sae = tdfunc.weights.sae_init(8, 32, generator=torch.Generator().manual_seed(0))
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> y = tdfunc.functional_call(net, None, (torch.randn(5, 4),), edits={"1": tdfunc.weights.sae_edit(sae)})
        >>> sae["W_dec"].shape, y.shape
        (torch.Size([32, 8]), torch.Size([5, 2]))

    References:
        Bricken et al. Towards Monosemanticity. Transformer Circuits Thread, 2023.

    Composes with: ``grad`` (train in your own loop), ``vmap`` (stacked SAEs), ``torch.compile``.
    """
    _check_dims(generator, d_in=d_in, d_hidden=d_hidden)
    return _init(d_in, d_hidden, d_in, generator, dtype, device)


@public("tdfunc.weights.transcoder_init")
def transcoder_init(
    d_in: int,
    d_hidden: int,
    d_out: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TensorDict:
    """Parameters of a ReLU transcoder (reads width ``d_in``, writes width ``d_out``) as a TensorDict.

    .. math::  \\hat y = \\mathrm{ReLU}(x W_{enc} + b_{enc})\\, W_{dec} + b_{dec}

    Same keys as :func:`tdfunc.weights.sae_init`, with ``"W_dec"`` (d_hidden, d_out) and ``"b_dec"`` (d_out,);
    decoder rows are random unit vectors, the encoder is Gaussian with std ``1/sqrt(d_in)``.

    Args:
        d_in: width of the source site it reads.
        d_hidden: number of features.
        d_out: width of the target site it writes.
        generator: random generator for the initialisation.
        dtype: dtype of the parameters.
        device: device of the parameters.

    Returns:
        TensorDict ``{"W_enc", "b_enc", "W_dec", "b_dec"}``; use it with :func:`tdfunc.weights.transcoder_edit`.

    Raises:
        WeightError: a width that is not an integer >= 1.

    Example:
        >>> import torch, tdfunc
        >>> tc = tdfunc.weights.transcoder_init(4, 16, 8)
        >>> tc["W_enc"].shape, tc["W_dec"].shape
        (torch.Size([4, 16]), torch.Size([16, 8]))

    References:
        Dunefsky, Chlenski, Nanda. Transcoders Find Interpretable LLM Feature Circuits. NeurIPS 2024.

    Composes with: ``grad``, ``vmap``, ``torch.compile`` (through :func:`tdfunc.weights.transcoder_edit`).
    """
    _check_dims(generator, d_in=d_in, d_hidden=d_hidden, d_out=d_out)
    return _init(d_in, d_hidden, d_out, generator, dtype, device)


def _check_sae(s: Any) -> TensorDictBase:
    s = check_td("the adapter state", s)
    missing = [k for k in _SAE_KEYS if k not in s.keys()]
    if missing:
        raise WeightError(
            f"the adapter state lacks {missing} (has {sorted(map(str, s.keys()))}); build it with "
            "tdfunc.weights.sae_init(d_in, d_hidden) or tdfunc.weights.transcoder_init(d_in, d_hidden, d_out)."
        )
    we, be, wd, bd = (s.get(k) for k in _SAE_KEYS)
    ok = (
        we.dim() == 2
        and wd.dim() == 2
        and be.shape == (we.shape[1],)
        and wd.shape[0] == we.shape[1]
        and bd.shape == (wd.shape[1],)
    )
    if not ok:
        raise WeightError(
            f"inconsistent adapter shapes W_enc {shape_str(we.shape)}, b_enc {shape_str(be.shape)}, "
            f"W_dec {shape_str(wd.shape)}, b_dec {shape_str(bd.shape)}; expected (d_in, h), (h,), (h, d_out), (d_out,)."
        )
    return s


@public("tdfunc.weights.sae_encode")
def sae_encode(sae_state: TensorDictBase, x: torch.Tensor) -> torch.Tensor:
    """Feature activations of an SAE or transcoder.

    .. math::  f = \\mathrm{ReLU}(x W_{enc} + b_{enc})

    Args:
        sae_state: from :func:`tdfunc.weights.sae_init` / :func:`tdfunc.weights.transcoder_init`.
        x: activations with last dim ``d_in`` (any leading dims).

    Returns:
        Features with last dim ``d_hidden`` (for sparsity penalties and feature analysis).

    Example:
        >>> import torch, tdfunc
        >>> sae = tdfunc.weights.sae_init(8, 32)
        >>> x = torch.randn(5, 8)
        >>> f = tdfunc.weights.sae_encode(sae, x)
        >>> f.shape, bool((f >= 0).all()), tdfunc.weights.sae_decode(sae, f).shape
        (torch.Size([5, 32]), True, torch.Size([5, 8]))

    Composes with: ``grad`` over the SAE state, ``vmap``, ``torch.compile``.
    """
    _check_codec_args(sae_state, x, "x")
    return torch.relu(x @ sae_state.get("W_enc") + sae_state.get("b_enc"))


@public("tdfunc.weights.sae_decode")
def sae_decode(sae_state: TensorDictBase, f: torch.Tensor) -> torch.Tensor:
    """Reconstruction from feature activations: ``f W_dec + b_dec`` (see :func:`tdfunc.weights.sae_encode`).

    Args:
        sae_state: from :func:`tdfunc.weights.sae_init` / :func:`tdfunc.weights.transcoder_init`.
        f: features with last dim ``d_hidden``.

    Returns:
        The reconstruction, last dim ``d_out`` (``d_in`` for an SAE).

    Example:
        >>> import torch, tdfunc
        >>> sae = tdfunc.weights.sae_init(8, 32, generator=torch.Generator().manual_seed(0))
        >>> f = torch.zeros(5, 32)
        >>> torch.equal(tdfunc.weights.sae_decode(sae, f), sae["b_dec"].expand(5, 8))
        True

    Composes with: ``grad``, ``vmap``, ``torch.compile``.
    """
    _check_codec_args(sae_state, f, "f")
    return f @ sae_state.get("W_dec") + sae_state.get("b_dec")


def _check_codec_args(s: Any, x: Any, name: str) -> None:
    """Types only (a hot path: no value checks)."""
    check_td("sae_state", s)
    if not isinstance(x, torch.Tensor):
        raise TdfuncTypeError(f"{name} must be a tensor (..., D), got {type(x).__name__} ({x!r:.60}).")


def _codec(s: TensorDictBase, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
    d_in = s.get("W_enc").shape[0]

    def run(v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[-1] != d_in:
            got = f"shape {shape_str(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise EditError(
                f"the adapter reads width d_in={d_in}, but the value at {site} has {got}; build the adapter "
                f"for that width (last dim) or use it at a site of width {d_in}."
            )
        return sae_decode(s, sae_encode(s, v))

    return public(here())(run)  # its errors, raised inside a later call, name sae_edit / transcoder_edit


@public("tdfunc.weights.sae_edit")
def sae_edit(sae_state: TensorDictBase) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit that replaces a site's value by its SAE reconstruction ``decode(encode(x))``.

    .. math::  x \\leftarrow \\mathrm{ReLU}(x W_{enc} + b_{enc})\\, W_{dec} + b_{dec}

    Use it as ``edits={site: tdfunc.weights.sae_edit(sae)}``; the SAE reads the site's last dim.  The edit
    closes over ``sae_state``, so ``grad`` / ``vmap`` over the SAE parameters pass through it.

    Args:
        sae_state: from :func:`tdfunc.weights.sae_init` (or trained from it).

    Returns:
        A callable edit ``fn(value) -> value``.

    Raises:
        WeightError: ``sae_state`` lacks a key or has inconsistent shapes (here).
        EditError: the site's width differs from ``d_in`` (when the edit runs).

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> sae, x = tdfunc.weights.sae_init(8, 32), torch.randn(5, 4)
        >>> y, acts = tdfunc.functional_call(net, None, (x,), edits={"1": tdfunc.weights.sae_edit(sae)}, capture="1")
        >>> torch.allclose(acts["1"], tdfunc.weights.sae_decode(sae, tdfunc.weights.sae_encode(sae, net[:2](x))))
        True

    Composes with: ``grad`` over the SAE state (double backward), ``vmap`` (stacked SAEs),
    ``torch.compile``.
    """
    s = _check_sae(sae_state)
    if s.get("W_enc").shape[0] != s.get("W_dec").shape[1]:
        raise WeightError(
            f"this adapter reads width {s.get('W_enc').shape[0]} and writes width "
            f"{s.get('W_dec').shape[1]}; an SAE "
            "edit must write what it reads. Use tdfunc.weights.transcoder_edit(state, source_site) for a transcoder."
        )
    return _codec(s, "the edited site")


@public("tdfunc.weights.transcoder_edit")
def transcoder_edit(tc_state: TensorDictBase, source_site: str) -> FromSite:
    """An edit that sets a site's value to a transcoder applied to the value at ``source_site``.

    .. math::  y_B \\leftarrow \\mathrm{ReLU}(x_A W_{enc} + b_{enc})\\, W_{dec} + b_{dec}

    ``edits={B: tdfunc.weights.transcoder_edit(tc, A)}`` replaces B's output (e.g. an MLP's) with the
    transcoder's reading of A (e.g. the MLP's input, ``"blocks.0.mlp:input"``) in the same call;
    ``A`` must run before ``B``.  Built on :func:`tdfunc.from_site`.

    Args:
        tc_state: from :func:`tdfunc.weights.transcoder_init` (or trained).
        source_site: the site whose value the transcoder reads.

    Returns:
        An edit for the ``edits`` mapping.

    Raises:
        WeightError: ``tc_state`` lacks a key or has inconsistent shapes.
        EditError: the source's width differs from ``d_in``, or the output's shape from the target's.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> tc, x = tdfunc.weights.transcoder_init(8, 16, 2), torch.randn(5, 4)
        >>> y = tdfunc.functional_call(net, None, (x,), edits={"2": tdfunc.weights.transcoder_edit(tc, "2:input")})
        >>> torch.allclose(y, tdfunc.weights.sae_decode(tc, tdfunc.weights.sae_encode(tc, net[:2](x))))
        True

    References:
        Dunefsky, Chlenski, Nanda. Transcoders Find Interpretable LLM Feature Circuits. NeurIPS 2024.

    Composes with: ``grad`` over the transcoder state, ``vmap``, ``torch.compile``.
    """
    s = _check_sae(tc_state)
    if not isinstance(source_site, str):
        raise TdfuncTypeError(
            f"source_site must be a site string, got {type(source_site).__name__} ({source_site!r:.60})."
        )
    return from_site(source_site, _codec(s, f"source site {source_site!r}"))


def _weight_key(flat: dict, key: Any) -> tuple:
    k = parse_key("keys", key)
    if k not in flat and k + ("weight",) in flat:
        k = k + ("weight",)  # a module name: its weight
    if k not in flat:
        names = known_names(flat)
        raise WeightError(
            f"unknown key {dotted(k)!r}: the state has no such entry.{suggest(dotted(k), names)} "
            "Name Linear weights as in the state ('fc1.weight') or by module ('fc1')."
        )
    if flat[k].dim() != 2 or not flat[k].is_floating_point():
        raise WeightError(
            f"{dotted(k)!r} has shape {shape_str(flat[k].shape)} and dtype {flat[k].dtype}; LoRA adapts "
            "floating-point 2-D (Linear) weights of shape (out, in)."
        )
    return k


@public("tdfunc.weights.lora_init")
def lora_init(
    state: TensorDictBase, keys: Key | Sequence[Key], rank: int, *, generator: torch.Generator | None = None
) -> TensorDict:
    """LoRA factors for the named Linear weights, as a TensorDict state.

    .. math::  W' = W + s\\, B A, \\quad A \\in \\mathbb{R}^{r \\times \\mathrm{in}},
        \\ B \\in \\mathbb{R}^{\\mathrm{out} \\times r}

    ``A`` is drawn uniform in ``±1/sqrt(in)`` (PEFT's Kaiming init), ``B`` is zero, so the adapted
    model starts equal to the base one.

    Args:
        state: the base state (for shapes, dtype and device).
        keys: weights to adapt: dotted names (``"fc1.weight"``), module names (``"fc1"``) or tuples.
        rank: the rank ``r``.
        generator: random generator for ``A``.

    Returns:
        TensorDict with ``(*key, "A")`` of shape (r, in) and ``(*key, "B")`` of shape (out, r) per key.

    Raises:
        WeightError: unknown key, a key that is not a 2-D float weight, rank < 1.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = tdfunc.weights.lora_init(tdfunc.state(net), ["0", "2"], rank=2)
        >>> lora["0", "weight", "A"].shape, lora["0", "weight", "B"].shape
        (torch.Size([2, 4]), torch.Size([8, 2]))

    References:
        Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022.

    Composes with: ``grad`` over the LoRA state in your training loop, ``vmap`` (stacked adapters).
    """
    flat = leaves(check_td("state", state))
    _check_dims(generator, rank=rank)
    if isinstance(keys, (str, tuple)):
        keys = [keys]
    if not keys:
        raise WeightError("keys is empty; name at least one Linear weight, e.g. ['fc1'].")
    out = {}
    for key in keys:
        k = _weight_key(flat, key)
        w = flat[k]
        n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)
        a = torch.rand(rank, n_in, generator=generator, dtype=w.dtype, device=w.device) * (2 * bound) - bound
        out[k + ("A",)] = a
        out[k + ("B",)] = torch.zeros(n_out, rank, dtype=w.dtype, device=w.device)
    return from_leaves(out)


@public("tdfunc.weights.apply_lora")
def apply_lora(state: TD, lora_state: TensorDictBase, scale: float | torch.Tensor = 1.0) -> TD:
    """A new state with ``W + scale · B @ A`` for every weight that ``lora_state`` adapts.

    .. math::  W' = W + s\\, B A

    Args:
        state: the base state.
        lora_state: from :func:`tdfunc.weights.lora_init` (or trained): ``(*key, "A")`` and ``(*key, "B")``.
        scale: ``s`` (often ``alpha / r``), a number or a 0-d tensor.

    Returns:
        A new TensorDict; ``state`` and ``lora_state`` are not written.

    Raises:
        WeightError: an adapted key not in the state, a missing factor, shapes with ``B @ A`` not
            equal to the weight's shape.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8))
        >>> state = tdfunc.state(net)
        >>> lora = tdfunc.weights.lora_init(state, ["0"], rank=2)
        >>> lora["0", "weight", "B"] = torch.ones(8, 2)
        >>> new = tdfunc.weights.apply_lora(state, lora, 0.5)
        >>> torch.allclose(new["0", "weight"], net[0].weight + 0.5 * torch.ones(8, 2) @ lora["0", "weight", "A"])
        True

    Composes with: ``grad`` w.r.t. the LoRA state (double backward), ``vmap`` (stacked adapters),
    ``torch.compile``.
    """
    flat = leaves(check_td("state", state))
    flat_l = leaves(check_td("lora_state", lora_state))
    scale = check_scale("scale", scale)
    groups: dict[tuple, dict] = {}
    for k, v in flat_l.items():
        if k[-1] not in ("A", "B") or len(k) < 2:
            raise WeightError(
                f"lora_state entry {dotted(k)!r} is neither an 'A' nor a 'B' factor; "
                "build it with tdfunc.weights.lora_init."
            )
        groups.setdefault(k[:-1], {})[k[-1]] = v
    new = {}
    for k, g in groups.items():
        if k not in flat:
            raise missing_entry(
                k,
                flat,
                f"lora_state adapts {dotted(k)!r}, which is not in the state.",
                "Build the adapter with tdfunc.weights.lora_init(state, keys, rank) on the same state.",
            )
        if set(g) != {"A", "B"}:
            raise WeightError(f"lora_state has only factor {sorted(g)} for {dotted(k)!r}; it needs both 'A' and 'B'.")
        a, b, w = g["A"], g["B"], flat[k]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise WeightError(
                f"LoRA factors for {dotted(k)!r} have B {shape_str(b.shape)} and A {shape_str(a.shape)}, "
                "but the weight "
                f"has shape {shape_str(w.shape)}; expected B (out, r) and A (r, in) "
                f"with (out, in) = {shape_str(w.shape)}."
            )
        new[k] = w + scale * (b @ a)
    return rebuild(state, new)
