"""scikit-learn probes per site: the split and the result layout of :func:`tdfunc.latent.fit_probes`."""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from .._errors import here, public
from ._probe_common import ProbeError, _key, _n_classes, _sites, _split

__all__ = ["fit_sklearn_probes"]


@public("tdfunc.latent.fit_sklearn_probes")
def fit_sklearn_probes(
    acts: TensorDictBase,
    y: torch.Tensor,
    estimator: Any = None,
    *,
    test_fraction: float = 0.25,
    random_state: int | None = None,
) -> TensorDict:
    """Fit a clone of a scikit-learn estimator per site; the same split and result layout as ``fit_probes``.

    .. math::
        \\text{for every site } s:\\quad \\hat f_s =
            \\operatorname{clone}(\\text{estimator}).\\mathrm{fit}(x_s[\\text{train}], y[\\text{train}])

    The split is ``fit_probes``'s with ``generator=torch.Generator().manual_seed(random_state)``, so
    both functions compare probes on the same examples.  ``loss`` is the mean cross-entropy of
    ``predict_proba`` (NaN for estimators without it).  Needs the ``probing`` extra (scikit-learn).

    Args:
        acts: ``{site: (N, D_site)}``.
        y: integer labels ``(N,)``.
        estimator: an unfitted scikit-learn classifier, cloned per site (default
            ``LogisticRegression(max_iter=1000)``).
        test_fraction: held-out fraction, strictly between 0 and 1.
        random_state: seed of the split (None: a fresh random split).

    Returns:
        TensorDict with ``("train", site)`` / ``("test", site)`` ``TensorDict(accuracy, loss)`` and
        ``train_index`` / ``test_index``.

    Raises:
        ImportError: scikit-learn is not installed.
        ProbeError: as ``fit_probes``.

    Example:
        >>> import torch, tdfunc
        >>> from tensordict import TensorDict
        >>> x = torch.randn(120, 6, generator=torch.Generator().manual_seed(0))
        >>> out = tdfunc.latent.fit_sklearn_probes(TensorDict({"a": x}, []), (x[:, 0] > 0).long(), random_state=0)
        >>> float(out["test", "a", "accuracy"]) > 0.9
        True

    References:
        Pedregosa et al. Scikit-learn: Machine Learning in Python. JMLR 2011.

    Composes with: ``fit_probes`` (same split for the same seed).
    """
    try:
        from sklearn.base import clone
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ImportError(
            f"{here()} needs scikit-learn; install the probing extra: pip install 'tdfunc[probing]' "
            "(or pip install scikit-learn)."
        ) from e
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
        raise ProbeError(f"random_state must be None or an integer seed, got {random_state!r}.")
    keys = _sites(acts)
    gen = None if random_state is None else torch.Generator().manual_seed(random_state)
    train, test = _split(acts, keys, y, test_fraction, gen)
    _n_classes(y, None)
    estimator = LogisticRegression(max_iter=1000) if estimator is None else estimator
    y_np = y.cpu().numpy()
    out = TensorDict({"train_index": train, "test_index": test}, batch_size=[])
    for k in keys:
        x = acts.get(k).detach()
        x_np = x.cpu().numpy()
        tr, te = train.cpu().numpy(), test.cpu().numpy()
        est = clone(estimator).fit(x_np[tr], y_np[tr])
        for phase, idx in (("train", tr), ("test", te)):
            acc = float((est.predict(x_np[idx]) == y_np[idx]).mean())
            loss = math.nan
            if hasattr(est, "predict_proba"):
                proba = torch.as_tensor(est.predict_proba(x_np[idx]), dtype=torch.float64)
                cls = torch.as_tensor(est.classes_).long()
                hit = cls[None, :] == torch.as_tensor(y_np[idx]).long()[:, None]  # class absent in train: p = 0
                loss = float(-(proba * hit).sum(1).clamp_min(1e-15).log().mean())
            out.set(
                (phase,) + _key(k),
                TensorDict(
                    {"accuracy": torch.tensor(acc, dtype=x.dtype), "loss": torch.tensor(loss, dtype=x.dtype)},
                    batch_size=[],
                ),
            )
    return out
