"""Streaming probes: fit and evaluate probes over the batches of a dataset (tdhook's ``ProbeManager`` lifecycle).

The probe state is a TensorDict updated by a pure function, optax-style: ``state = probe_stream_init(...)``,
``state = probe_stream_update(state, acts, y)`` per batch, ``params = probe_stream_params(state)``.  The
mean-difference probe keeps per-class sums and counts (exactly the fit on the concatenated data, in
``O(C D)`` memory); the gradient-trained kinds take one Adam step per batch (minibatch Adam, as tdhook's
``TorchEstimator``).  :func:`stream_probes` runs a model over a dataset through
:func:`tdfunc.latent.cache_activations`, one batch at a time, and drives the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.func import grad

from .._checks import check_bool, check_generator, renamed
from .._errors import here, public
from .._progress import progress_bar
from .._types import ProbeKind, Reduction
from ._cache import cache_activations
from ._probe import _apply, _check_normalize, _check_normalize_classes, _init, _loss
from ._probe_common import ProbeError, _check_int, _check_kind, _check_labels, _cross_entropy, _key, _sites

__all__ = ["probe_stream_init", "probe_stream_update", "probe_stream_params", "stream_probes"]

_B1, _B2, _EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


def _transformed() -> bool:
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def _state_kind(state: Any) -> str:
    if isinstance(state, TensorDictBase) and "sums" in state.keys() and "counts" in state.keys():
        return "mean_difference"
    if isinstance(state, TensorDictBase) and {"params", "m", "v", "step"} <= set(state.keys()):
        return "trained"
    raise ProbeError(
        f"state must be the TensorDict of tdfunc.latent.probe_stream_init (or of "
        f"probe_stream_update), got {type(state).__name__}"
        + (f" with keys {sorted(state.keys())}" if isinstance(state, TensorDictBase) else "")
        + "."
    )


def _sites_of(state: TensorDictBase, kind: str) -> list[tuple]:
    """The state's sites (tuples), in the order probe_stream_init saw them."""
    if kind == "mean_difference":
        return [_key(k) for k in state["sums"].keys(include_nested=True, leaves_only=True)]
    params = state["params"]
    names = {"weight", "bias", "u", "v"}
    return list(
        dict.fromkeys(_key(k)[:-1] for k in params.keys(include_nested=True, leaves_only=True) if _key(k)[-1] in names)
    )


@public("tdfunc.latent.probe_stream_init")
def probe_stream_init(
    kind: ProbeKind,
    acts: TensorDictBase,
    n_classes: int,
    *,
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """The initial state of streaming probes, one per site of ``acts`` (the activations of a first batch).

    .. math::
        \\text{mean difference: } S_c = 0, \\; n_c = 0; \\qquad
        \\text{trained kinds: } \\theta_s \\sim \\texttt{probe\\_init}, \\; m = v = 0, \\; t = 0

    Only the widths, dtype and device of ``acts`` are used.  The initial parameters are drawn from
    ``generator`` in site order, as :func:`tdfunc.latent.fit_probes` draws them (bilinear kinds probe
    ``x1 = x2 = x_s``).

    Args:
        kind: ``"linear"``, ``"bilinear"``, ``"low_rank_bilinear"`` or ``"mean_difference"``.
        acts: ``{site: (B, D_site)}`` floating activations, e.g. ``cache_activations`` of one batch.
        n_classes: number of classes C (>= 2; a stream cannot read it from labels it has not seen).
        rank: rank of ``"low_rank_bilinear"``.
        generator: random generator for the initialisation.

    Returns:
        The state TensorDict: ``("sums", site)`` ``(C, D)`` and ``counts`` ``(C,)`` for the mean
        difference; ``("params", site)``, the Adam moments ``("m", site)`` / ``("v", site)`` and
        ``step`` otherwise.

    Raises:
        ProbeError: unknown kind, missing rank, ``acts`` not a TensorDict of ``(B, D)`` floats,
            ``n_classes < 2``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> acts = TensorDict({"h": torch.randn(8, 5)}, batch_size=[8])
        >>> s = tdfunc.latent.probe_stream_init("mean_difference", acts, 3)
        >>> s["sums", "h"].shape, s["counts"]
        (torch.Size([3, 5]), tensor([0., 0., 0.]))

    Composes with: its result is the state of :func:`probe_stream_update` (``vmap`` / ``grad`` /
    ``torch.compile``).
    """
    _check_kind(kind, rank)
    check_generator(generator, ProbeError)
    _check_int("n_classes", n_classes, 2)
    keys = _sites(acts)
    first = acts.get(keys[0])
    out = TensorDict({}, batch_size=[])
    if kind == "mean_difference":
        for k in keys:
            x = acts.get(k)
            out.set(("sums",) + _key(k), torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device))
        out.set("counts", torch.zeros(n_classes, dtype=first.dtype, device=first.device))
        return out
    for k in keys:
        x = acts.get(k)
        d_in = x.shape[1] if kind == "linear" else (x.shape[1], x.shape[1])
        for name, v in _init(kind, d_in, n_classes, rank, generator, x.dtype, x.device).items():
            out.set(("params",) + _key(k) + (name,), v)
            out.set(("m",) + _key(k) + (name,), torch.zeros_like(v))
            out.set(("v",) + _key(k) + (name,), torch.zeros_like(v))
    out.set("step", torch.zeros((), dtype=torch.float64, device=first.device))
    return out


def _batch(state: TensorDictBase, kind: str, acts: Any, y: Any) -> tuple[list[tuple], torch.Tensor, int]:
    sites = _sites_of(state, kind)
    if not isinstance(acts, TensorDictBase):
        raise ProbeError(
            f"acts must be a TensorDict {{site: (B, D_site)}} with the state's sites, got {type(acts).__name__}."
        )
    have = {_key(k) for k in acts.keys(include_nested=True, leaves_only=True)}
    missing = [s for s in sites if s not in have]
    if missing:
        raise ProbeError(
            f"acts lacks the state's sites {['.'.join(s) for s in missing]} (it has "
            f"{sorted('.'.join(s) for s in have)}); pass the activations of the sites the state was "
            "initialised with."
        )
    _sites(acts.select(*sites))  # floating (B, D) leaves, finite
    n = acts.get(sites[0]).shape[0]
    y = _check_labels(y, n, f"acts[{'.'.join(sites[0])!r}]")
    c = state["counts"].shape[0] if kind == "mean_difference" else None
    if c is None:
        p0 = state["params"].get(sites[0])
        c = p0["bias"].shape[0] if "bias" in p0.keys() else p0["means"].shape[0]
    if not _transformed() and y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ProbeError(
            f"y holds labels in [{int(y.min())}, {int(y.max())}] but the state has n_classes={c}; "
            f"labels are class indices 0..{c - 1}."
        )
    for s in sites:
        width = acts.get(s).shape[1]
        want = (
            state["sums"].get(s).shape[1]
            if kind == "mean_difference"
            else next(iter(state["params"].get(s).values())).shape[1]
        )
        if width != want:
            raise ProbeError(
                f"acts[{'.'.join(s)!r}] has width {width} but the state's probe there has width "
                f"{want}; pass the same sites, reduced the same way, for every batch."
            )
    return sites, y, c


@public("tdfunc.latent.probe_stream_update")
def probe_stream_update(
    state: TensorDictBase,
    acts: TensorDictBase,
    y: torch.Tensor,
    *,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
) -> TensorDict:
    """One streaming step: the probe state after the batch ``(acts, y)``; pure (a new TensorDict).

    .. math::
        \\text{mean difference: } S_c \\mathrel{+}= \\sum_{n: y_n = c} x_n, \\; n_c \\mathrel{+}= |\\{n: y_n = c\\}|;
        \\qquad \\text{trained kinds: } \\theta \\leftarrow \\mathrm{Adam}\\big(\\theta, \\nabla_\\theta
            \\tfrac1B \\textstyle\\sum_n \\ell(z_\\theta(x_n), y_n) + \\tfrac{\\lambda}{2}\\lVert W\\rVert^2\\big)

    The mean-difference update is exact: after any split of the data into batches,
    :func:`probe_stream_params` equals ``probe_fit("mean_difference", ...)`` on the concatenation.
    A trained kind takes one Adam step (``torch.optim.Adam``'s, bias-corrected by the state's
    ``step``) on the batch's mean cross-entropy, every site independently; a single batch streamed
    ``steps`` times equals ``probe_fit(..., steps=steps)``.

    Args:
        state: from :func:`probe_stream_init` or a previous update.
        acts: ``{site: (B, D_site)}`` for the state's sites (more sites are ignored).
        y: integer labels ``(B,)`` in ``0..C-1``.
        lr: Adam learning rate (trained kinds).
        weight_decay: L2 coefficient on ``weight`` / ``u`` / ``v`` (trained kinds).

    Returns:
        The new state (same keys).

    Raises:
        ProbeError: a state that is not from ``probe_stream_init``, missing sites or other widths,
            labels not ``(B,)`` integers or outside ``0..C-1``, bad ``lr`` / ``weight_decay``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> x, y = torch.randn(100, 4), torch.arange(100) % 2
        >>> batches = [TensorDict({"h": x[i:i + 25]}, batch_size=[25]) for i in range(0, 100, 25)]
        >>> s = tdfunc.latent.probe_stream_init("mean_difference", batches[0], 2)
        >>> for i, acts in enumerate(batches):
        ...     s = tdfunc.latent.probe_stream_update(s, acts, y[25 * i:25 * (i + 1)])
        >>> full = tdfunc.latent.probe_fit("mean_difference", x, y)  # the fit on all 100 rows
        >>> bool(torch.allclose(tdfunc.latent.probe_stream_params(s)["h", "means"], full["means"], atol=1e-6))
        True

    Composes with: ``vmap`` (over stacked batches or states), ``grad`` (w.r.t. the activations and
    the state), ``torch.compile(fullgraph=True)``.
    """
    kind = _state_kind(state)
    for name, v, ok, want in (
        ("lr", lr, lambda v: v > 0, "> 0"),
        ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ProbeError(f"{name} must be a number {want}, got {v!r}.")
    sites, y, c = _batch(state, kind, acts, y)
    out = state.copy()
    if kind == "mean_difference":
        first = acts.get(sites[0])
        onehot = F.one_hot(y, c).to(first.dtype)
        for s in sites:
            out.set(("sums",) + s, state["sums"].get(s) + onehot.mT @ acts.get(s))
        out.set("counts", state["counts"] + onehot.sum(0))
        return out
    xs = {s: acts.get(s) for s in sites}
    params = {s: dict(state["params"].get(s).items()) for s in sites}

    def total(p: dict) -> torch.Tensor:  # the sites' losses are independent: one gradient for all
        return sum(
            (_loss(p[s], xs[s], y, weight_decay) for s in sites),
            torch.zeros((), dtype=xs[sites[0]].dtype, device=xs[sites[0]].device),
        )

    g = grad(total)(params)
    t = state["step"] + 1
    c1 = lr / (1 - _B1**t)
    c2 = (1 - _B2**t).sqrt()
    for s in sites:
        for name, gv in g[s].items():
            key = s + (name,)
            m = _B1 * state["m"].get(key) + (1 - _B1) * gv
            v = _B2 * state["v"].get(key) + (1 - _B2) * gv.square()
            out.set(("m",) + key, m)
            out.set(("v",) + key, v)
            out.set(("params",) + key, params[s][name] - (c1 * m / (v.sqrt() / c2 + _EPS)).to(gv.dtype))
    out.set("step", t)
    return out


@public("tdfunc.latent.probe_stream_params")
def probe_stream_params(state: TensorDictBase, *, normalize: bool = False) -> TensorDict:
    """The probes of a streaming state, ``{site: params}`` for :func:`tdfunc.latent.probe_apply`.

    .. math::
        \\mu_c = S_c / n_c \\text{ (mean difference)}, \\qquad \\theta_s \\text{ (trained kinds)}

    Args:
        state: from :func:`probe_stream_init` / :func:`probe_stream_update`.
        normalize: two-class mean difference: add ``scale = 1 / ‖μ_1 - μ_0‖`` as
            ``probe_fit(..., normalize=True)`` does (tdhook's ``MeanDifferenceClassifier(normalize=True)``).

    Returns:
        TensorDict ``{site: params}``.

    Raises:
        ProbeError: a state that is not from ``probe_stream_init``; a mean-difference class no batch
            had an example of; ``normalize`` with a trained kind or more than 2 classes.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> acts = TensorDict({"h": torch.tensor([[0.0], [1.0], [3.0], [4.0]])}, batch_size=[4])
        >>> s = tdfunc.latent.probe_stream_init("mean_difference", acts, 2)
        >>> s = tdfunc.latent.probe_stream_update(s, acts, torch.tensor([0, 0, 1, 1]))
        >>> tdfunc.latent.probe_stream_params(s)["h", "means"]
        tensor([[0.5000],
                [3.5000]])

    Composes with: ``vmap``, ``grad``, ``torch.compile`` (the class check reads the counts outside
    transforms only).
    """
    kind = _state_kind(state)
    _check_normalize(normalize, "mean_difference" if kind == "mean_difference" else "linear")
    out = TensorDict({}, batch_size=[])
    if kind != "mean_difference":
        for s in _sites_of(state, kind):
            out.set(s, state["params"].get(s).copy())
        return out
    counts = state["counts"]
    _check_normalize_classes(normalize, counts.shape[0])
    if not _transformed() and bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ProbeError(
            f"classes {empty} had no example in the batches streamed so far, so their mean is "
            "undefined; stream more data or initialise with n_classes equal to the classes present."
        )
    for s in _sites_of(state, kind):
        means = state["sums"].get(s) / counts[:, None]
        p = TensorDict({"means": means}, batch_size=[])
        if normalize:
            gap = torch.linalg.vector_norm(means[1] - means[0])
            p.set("scale", torch.where(gap > 0, 1 / torch.where(gap > 0, gap, 1), 1))
        out.set(s, p)
    return out


def _acts(module, mstate, batch, sites, reduce, input_key, inputs) -> TensorDict:
    acts = cache_activations(
        module, mstate, [batch], sites, reduce=reduce, input_key=input_key, inputs=inputs, progress=False, group=False
    )
    out = acts.apply(lambda t: t.flatten(1) if t.dim() != 2 else t, batch_size=acts.batch_size[:1])
    assert out is not None  # apply without out-of-place=False returns the new TensorDict
    return out


def _labels(batch: Any, label_key: str | tuple[str, ...]) -> torch.Tensor:
    if not isinstance(batch, TensorDictBase) or label_key not in batch.keys(include_nested=True):
        have = sorted(map(str, batch.keys())) if isinstance(batch, TensorDictBase) else type(batch).__name__
        raise ProbeError(
            f"every batch must be a TensorDict holding the labels at label_key={label_key!r}, got "
            f"{have}; pass label_key= naming the labels' entry."
        )
    return batch.get(label_key)


def _evaluate(module, mstate, params, batches, sites, label_key, reduce, input_key, inputs, bar) -> TensorDict:
    """Accuracy and mean cross-entropy over every row of ``batches`` (equal to probe_evaluate on their
    concatenation)."""
    correct: dict = {}
    loss: dict = {}
    n = 0
    for batch in batches:
        y = _labels(batch, label_key)
        acts = _acts(module, mstate, batch, sites, reduce, input_key, inputs)
        keys = [_key(k) for k in params.keys(include_nested=True, leaves_only=True)]
        for s in dict.fromkeys(k[:-1] for k in keys):
            logits = _apply(params.get(s), acts.get(s))
            y = _check_labels(y, logits.shape[0])
            correct[s] = correct.get(s, 0) + (logits.argmax(-1) == y).to(logits.dtype).sum()
            loss[s] = loss.get(s, 0) + _cross_entropy(logits, y) * y.shape[0]
        n += int(y.shape[0])
        if bar is not None:
            bar.update(1)
    out = TensorDict({}, batch_size=[])
    for s in correct:
        out.set(s, TensorDict({"accuracy": correct[s] / n, "loss": loss[s] / n}, batch_size=[]))
    return out


@public("tdfunc.latent.stream_probes")
def stream_probes(
    module: nn.Module,
    state: Any,
    batches: Iterable[TensorDictBase],
    sites: str | Sequence[str],
    *,
    n_classes: int,
    label_key: str | tuple[str, ...] = "label",
    kind: ProbeKind = "linear",
    epochs: int = 1,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    rank: int | None = None,
    normalize: bool = False,
    generator: torch.Generator | None = None,
    eval_batches: Iterable[TensorDictBase] | None = None,
    reduce: Reduction | Callable[..., torch.Tensor] | None = None,
    input_key: str | None = "input",
    inputs: Callable[[TensorDictBase], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    progress: bool = False,
) -> TensorDict:
    """Fit probes on ``sites`` over the batches of a dataset, then evaluate them: tdhook's ``ProbeManager``
    fit / predict lifecycle, streaming (one batch of activations in memory at a time).

    .. math::
        s_0 = \\texttt{probe\\_stream\\_init}, \\quad
        s_{i+1} = \\texttt{probe\\_stream\\_update}(s_i, a(x_{b_i}), y_{b_i}) \\text{ over } \\texttt{epochs}
        \\text{ passes}, \\quad \\theta = \\texttt{probe\\_stream\\_params}(s)

    Each batch runs through :func:`tdfunc.latent.cache_activations` (its ``reduce``, ``input_key``
    and ``inputs``; values flattened to ``(B, D)``), then updates the probe state.  After fitting,
    one more pass over ``batches`` gives the ``"fit"`` metrics and a pass over ``eval_batches`` the
    ``"predict"`` metrics (tdhook's ``results["fit" | "predict", key]``): accuracy and mean
    cross-entropy over all rows, equal to :func:`probe_evaluate` on the concatenated data.  The
    mean-difference probe is exact in one epoch (equal to fitting on the concatenation); trained
    kinds take one Adam step per batch (shuffle the ``DataLoader`` for SGD-style epochs).

    Args:
        module: the model.
        state: its state (:func:`tdfunc.state`), or ``None`` for the module's own tensors.
        batches: re-iterable batches (TensorDicts, dim 0 = examples) holding the model input and the
            labels, e.g. a ``DataLoader`` yielding TensorDicts.
        sites: the sites to probe (globs too), as for ``cache_activations``.
        n_classes: number of classes C (>= 2).
        label_key: the batch entry with the integer labels ``(B,)``.
        kind, lr, weight_decay, rank, normalize, generator: as in :func:`probe_fit`.
        epochs: passes over ``batches`` (>= 1).
        eval_batches: held-out batches for the ``"predict"`` metrics, or ``None``.
        reduce, input_key, inputs: as in :func:`tdfunc.latent.cache_activations`.
        progress: show a tqdm bar over the batches of all passes.

    Returns:
        TensorDict with ``("params", site)`` the fitted probes, ``("fit", site)`` and (with
        ``eval_batches``) ``("predict", site)`` each ``TensorDict(accuracy, loss)``.

    Raises:
        ProbeError: bad options (as in ``probe_fit``), no batches, a batch without ``label_key``,
            labels outside ``0..C-1``; CacheError: a batch the model cannot be run on (see
            ``cache_activations``).

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
        >>> data = [TensorDict({"input": x[i:i + 20], "label": (x[i:i + 20, 0] > 0).long()}, [20]) for i in (0, 20, 40)]
        >>> out = tdfunc.latent.stream_probes(net, tdfunc.state(net), data, ["0"], n_classes=2, kind="mean_difference")
        >>> sorted(out.keys()), float(out["fit", "0", "accuracy"]) > 0.7
        (['fit', 'params'], True)

    References:
        Alain, Bengio. Understanding intermediate layers using linear classifier probes. 2016.

    Composes with: :func:`probe_stream_init` / :func:`probe_stream_update` / :func:`probe_stream_params`
    (the pure steps it drives), :func:`tdfunc.latent.probe_apply` for the fitted probes.
    """
    _check_kind(kind, rank)
    check_generator(generator, ProbeError)
    _check_int("n_classes", n_classes, 2)
    _check_int("epochs", epochs, 1)
    _check_normalize(normalize, kind)
    _check_normalize_classes(normalize, n_classes)
    check_bool("progress", progress, ProbeError)
    for name, v, ok, want in (
        ("lr", lr, lambda v: v > 0, "> 0"),
        ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ProbeError(f"{name} must be a number {want}, got {v!r}.")
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches) * (epochs + 1)  # type: ignore[arg-type]
        if eval_batches is not None and hasattr(eval_batches, "__len__"):
            total += len(eval_batches)  # type: ignore[arg-type]
    bar = progress_bar(enabled=progress, desc=here(), total=total, unit="batch")
    try:
        pstate: TensorDict | None = None
        for _ in range(epochs):
            for batch in batches:
                y = _labels(batch, label_key)
                acts = _acts(module, state, batch, sites, reduce, input_key, inputs)
                current = (
                    pstate
                    if pstate is not None
                    else probe_stream_init(kind, acts, n_classes, rank=rank, generator=generator)
                )
                pstate = _renamed(lambda: probe_stream_update(current, acts, y, lr=lr, weight_decay=weight_decay))
                if bar is not None:
                    bar.update(1)
        if pstate is None:
            raise ProbeError("batches is empty; pass at least one batch (a re-iterable list or DataLoader).")
        final = pstate
        params = _renamed(lambda: probe_stream_params(final, normalize=normalize))
        out = TensorDict({"params": params}, batch_size=[])
        out.set("fit", _evaluate(module, state, params, batches, sites, label_key, reduce, input_key, inputs, bar))
        if eval_batches is not None:
            out.set(
                "predict",
                _evaluate(module, state, params, eval_batches, sites, label_key, reduce, input_key, inputs, bar),
            )
    finally:
        if bar is not None:
            bar.close()
    return out


def _renamed(call: Callable[[], Any]) -> Any:
    """Run a public step inside the driver, its errors naming the driver."""
    with renamed(("tdfunc.latent.probe_stream_update: ", "tdfunc.latent.probe_stream_params: ")):
        return call()
