"""Types: the Literal aliases list the options the runtime checks accept, the overloads of functional_call /
intervene (and the Tensor-or-TensorDict functions) give the types a checker sees, and the public API's
type completeness stays at least 95% (``make types`` runs the same checks on every ``make test``)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
import textwrap
from typing import get_args

import pytest

from tdfunc import _types

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _options():
    from tdfunc.attribution import _lrp_attention, _lrp_composites, _maximise, _noise, _quadrature
    from tdfunc.latent import _cache, _probe_common, _similarity
    from tdfunc.weights import _prune

    rows = [
        (_types.IGMethod, _quadrature.METHODS),
        (_types.IGStrategy, _quadrature.STRATEGIES),
        (_types.NoiseType, _noise.NT_TYPES),
        (_types.Optimizer, _maximise.OPTIMIZERS),
        (_types.CompositeName, (*_lrp_composites.COMPOSITES, *_lrp_composites.ZENNIT_NAMES)),
        (_types.SoftmaxMode, _lrp_attention._SOFTMAX_MODES),
        (_types.Reduction, _cache.REDUCTIONS),
        (_types.ProbeKind, _probe_common.KINDS),
        (_types.Kernel, _similarity.KERNELS),
        (_types.PruneScope, _prune.SCOPES),
    ]
    if importlib.util.find_spec("matplotlib") is not None:
        from tdfunc.plot import _common, _image

        rows += [
            (_types.PlotMethod, _image.METHODS),
            (_types.Sign, _common.SIGNS),
            (_types.UpsampleMode, _common.UPSAMPLE_MODES),
        ]
    return rows


def test_literal_aliases_list_the_options_the_checks_accept():
    for alias, options in _options():
        assert sorted(get_args(alias)) == sorted(options), alias


def test_attribution_all_is_every_public_name():
    """``tdfunc.attribution.__all__`` is a literal list (type checkers follow ``from .attribution import *``
    only through one); it must hold every public name the package imports."""
    import inspect

    import tdfunc.attribution as a

    public = sorted(n for n, v in vars(a).items() if not n.startswith("_") and not inspect.ismodule(v))
    assert a.__all__ == public


SNIPPET = """
    import torch
    import tdfunc
    from tensordict import TensorDict

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    x = torch.randn(2, 3)
    td = TensorDict({"x": x}, batch_size=[2])

    def f(x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return net(x) * scale

    reveal_type(tdfunc.functional_call(net, None, (x,)))  # R1
    reveal_type(tdfunc.functional_call(net, None, (x,), capture=["0"]))  # R2
    reveal_type(tdfunc.intervene(f, net, edits={"1": tdfunc.delta(torch.zeros(4))}))  # R3
    reveal_type(tdfunc.intervene(f, net, capture="0"))  # R4
    reveal_type(tdfunc.intervene(f, net, capture="0")(x, scale=2.0))  # R5
    reveal_type(tdfunc.latent.mle_dimension(x))  # R6
    reveal_type(tdfunc.latent.mle_dimension(td))  # R7
    reveal_type(tdfunc.latent.steering_vector(x, x))  # R8
    reveal_type(tdfunc.saliency(lambda t: net(t["x"]).sum(-1), td))  # R9
    reveal_type(tdfunc.functional_call(net, None, (x,), return_state=True))  # R10
    reveal_type(tdfunc.functional_call(net, None, (x,), capture="0", return_state=True))  # R11
    reveal_type(tdfunc.weights.apply_task_vector(td, td))  # R12
    tdfunc.intervene(f, net)("not a tensor")  # E1
    tdfunc.integrated_gradients(lambda t: t["x"].sum(-1), td, method="riemann_leftt")  # E2
    tdfunc.latent.fit_probes(td, torch.zeros(2), kind="mlp")  # E3
"""

EXPECTED = {
    "R1": "Any",
    "R2": "tuple[Any, tensordict._td.TensorDict]",
    "R3": "def (x: torch._tensor.Tensor, *, scale: float =) -> torch._tensor.Tensor",
    "R4": "def (x: torch._tensor.Tensor, *, scale: float =) -> tuple[torch._tensor.Tensor, tensordict._td.TensorDict]",
    "R5": "tuple[torch._tensor.Tensor, tensordict._td.TensorDict]",
    "R6": "torch._tensor.Tensor",
    "R7": "tensordict._td.TensorDict",
    "R8": "torch._tensor.Tensor",
    "R9": "tensordict._td.TensorDict",
    "R10": "tuple[Any, tensordict._td.TensorDict]",
    "R11": "tuple[Any, tensordict._td.TensorDict, tensordict._td.TensorDict]",
    "R12": "tensordict._td.TensorDict",
}


def test_overloads_and_literals_as_mypy_sees_them(tmp_path):
    """mypy (run from the checkout, so it finds tdfunc and reuses ``make types``' cache) on a snippet."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -r requirements-types.txt)")
    src = textwrap.dedent(SNIPPET)
    path = tmp_path / "snippet.py"
    path.write_text(src)
    lines = {m.group(1): i + 1 for i, line in enumerate(src.splitlines()) if (m := re.search(r"# ([RE]\d+)$", line))}
    cmd = [sys.executable, "-m", "mypy", "--no-error-summary", "--no-color-output", "--no-pretty", str(path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    # mypy replays a cached result of an unchanged module with the path it had then: match the file name only
    out = [line for line in run.stdout.splitlines() if re.match(r".*snippet\.py:\d+: ", line)]
    revealed = {
        int(m.group(1)): m.group(2)
        for line in out
        if (m := re.search(r":(\d+): note: Revealed type is \"(.*)\"", line))
    }
    errors = {int(m.group(1)) for line in out if (m := re.search(r":(\d+): error:", line))}
    for tag, want in EXPECTED.items():
        assert revealed.get(lines[tag]) == want, (tag, revealed.get(lines[tag]), run.stdout[-3000:])
    assert errors == {lines[t] for t in ("E1", "E2", "E3")}, run.stdout[-3000:]


def test_type_completeness():
    """pyright's ``--verifytypes`` score of the public API (``.ci/type_completeness.py``, as ``make types``)."""
    here = pathlib.Path(sys.executable).parent
    import shutil

    if not any((here / n).exists() or shutil.which(n) for n in ("basedpyright", "pyright")):
        pytest.skip(
            "neither basedpyright nor pyright is installed (pip install -r requirements-types.txt); "
            "make types installs it and runs this check"
        )
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "type_completeness.py"), "95"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
