"""``fit_probes``: one probe per site of a capture TensorDict, sites of equal width in one batched run."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch.func import vmap

from .._checks import check_bool, check_generator
from .._errors import here, public
from .._progress import progress_bar
from .._types import ProbeKind
from ._probe import (
    _adam,
    _apply,
    _check_means_counts,
    _check_normalize,
    _check_normalize_classes,
    _check_train_options,
    _class_means,
    _init,
    _loss,
)
from ._probe_common import (
    ProbeError,
    _check_kind,
    _key,
    _metrics,
    _n_classes,
    _sites,
    _split,
)
from ._probe_sklearn import fit_sklearn_probes as fit_sklearn_probes

__all__ = ["fit_probes"]


@public("tdfunc.latent.fit_probes")
def fit_probes(
    acts: TensorDictBase,
    y: torch.Tensor,
    *,
    kind: ProbeKind = "linear",
    test_fraction: float = 0.25,
    steps: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    rank: int | None = None,
    n_classes: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    normalize: bool = False,
) -> TensorDict:
    """Fit one probe per site of a capture TensorDict on a train split; report train and test metrics.

    .. math::
        \\text{for every site } s:\\quad \\theta_s = \\texttt{probe\\_fit}(x_s[\\text{train}], y[\\text{train}]),
        \\qquad \\text{metrics on train and test}

    One random split (``test_fraction`` of the N examples held out), drawn first from
    ``generator``; each site's initial parameters are then drawn in site order, so the result equals
    ``probe_fit`` called per site with the same generator.  Sites of equal width train together in
    one batched Adam run (``vmap`` over the sites; the sites' losses are independent, so this is the
    per-site fit).  Bilinear kinds probe each site with ``x1 = x2 = x_s``.

    Args:
        acts: ``{site: (N, D_site)}``, e.g. the captures of ``tdfunc.functional_call``.
        y: integer labels ``(N,)``.
        kind, steps, lr, weight_decay, rank, n_classes, normalize: as in ``probe_fit`` (``n_classes``
            defaults to ``max(y) + 1`` over all of ``y``).
        test_fraction: held-out fraction, strictly between 0 and 1.
        generator: random generator for the split and the initialisations.
        progress: show one tqdm bar on stderr over the Adam steps of every batched run (``steps`` per
            group of equal-width sites; none for ``"mean_difference"``); never shown under ``vmap`` /
            ``grad`` / ``torch.compile``.

    Returns:
        TensorDict with ``("train", site)`` and ``("test", site)`` each ``TensorDict(accuracy, loss)``,
        ``("params", site)`` the fitted probe, and ``train_index`` / ``test_index`` (the split).

    Raises:
        ProbeError: acts not a TensorDict of ``(N, D)`` floats, ``y`` of the wrong length,
            ``test_fraction`` outside (0, 1), unknown kind, missing rank.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> x = torch.randn(120, 6, generator=torch.Generator().manual_seed(0))
        >>> y = (x[:, 0] > 0).long()
        >>> noise = torch.randn(120, 6, generator=torch.Generator().manual_seed(1))
        >>> acts = TensorDict({"signal": x, "noise": noise}, batch_size=[])
        >>> out = tdfunc.latent.fit_probes(acts, y, steps=100, lr=0.05, generator=torch.Generator().manual_seed(0))
        >>> out["test", "signal", "accuracy"] > out["test", "noise", "accuracy"]
        tensor(True)

    References:
        Alain, Bengio. Understanding intermediate layers using linear classifier probes. 2016.

    Composes with: ``tdfunc.functional_call(..., capture=[...])`` for ``acts``; the fitted
    ``("params", site)`` go into ``probe_apply``.
    """
    _check_kind(kind, rank)
    check_generator(generator, ProbeError)
    _check_train_options(steps, lr, weight_decay)
    check_bool("progress", progress, ProbeError)
    _check_normalize(normalize, kind)
    keys = _sites(acts)
    train, test = _split(acts, keys, y, test_fraction, generator)
    c = _n_classes(y, n_classes)
    y_tr, y_te = y[train], y[test]
    xs = {k: acts.get(k).detach() for k in keys}
    if kind == "mean_difference":
        _check_normalize_classes(normalize, c)
        _check_means_counts(y_tr, c)
        inits = None
    else:
        inits = {k: _init(kind, xs[k].shape[1], c, rank, generator, xs[k].dtype, xs[k].device) for k in keys}
    groups: dict = {}
    for k in keys:
        groups.setdefault((xs[k].shape[1], xs[k].dtype, xs[k].device), []).append(k)
    out = TensorDict({"train_index": train, "test_index": test}, batch_size=[])
    bar = (
        None
        if kind == "mean_difference"
        else progress_bar(enabled=progress, desc=here(), total=steps * len(groups), unit="step")
    )
    try:
        for group in groups.values():
            x_tr = torch.stack([xs[k][train] for k in group])
            if kind == "mean_difference":
                fitted = vmap(lambda xx: _class_means(xx, y_tr, c, normalize))(x_tr)
            else:
                stacked = {
                    name: torch.stack([inits[k][name] for k in group])  # type: ignore[index]
                    for name in inits[group[0]]  # type: ignore[index]
                }
                site_loss = lambda p, xx: _loss(p, xx, y_tr, weight_decay)  # noqa: E731
                fitted = _adam(lambda p: vmap(site_loss)(p, x_tr).sum(), stacked, steps, lr, bar)
            for i, k in enumerate(group):
                p = TensorDict({name: v[i] for name, v in fitted.items()}, batch_size=[])
                out.set(("params",) + _key(k), p)
                out.set(("train",) + _key(k), _metrics(_apply(p, xs[k][train]), y_tr))
                out.set(("test",) + _key(k), _metrics(_apply(p, xs[k][test]), y_te))
    finally:
        if bar is not None:
            bar.close()
    return out
