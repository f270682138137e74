"""One site-pattern grammar (tdfunc/_match.py): every site-taking public function reads ``"?"``, ``"*"``,
``"**"`` and ``"a.*.b"`` the same way (``*`` / ``?`` within a name segment, ``**`` across segments).

Layer attribution (``grad_cam``, ...) takes one site and rejects globs; LRP composites match module names
with the same ``_path_match`` (pinned in the LRP tests).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc._match import entry_match, path_match, site_match, split_site
from tdfunc._sites import _path_match, is_installed


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.c = nn.Tanh()

    def forward(self, x):
        return self.c(self.b(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.a(x))


torch.manual_seed(0)
NET = Net().double()
ALL = ["a", "a.0", "a.0.b", "a.0.c", "a.1", "a.1.b", "a.1.c", "head"]
EXPECTED = {"?": ["a"], "*": ["a", "head"], "**": ALL, "a.*.b": ["a.0.b", "a.1.b"]}
PATTERNS = list(EXPECTED)
CLEAN, CORRUPT = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)


def _captured(pattern):
    return sorted(tdfunc.functional_call(NET, None, (CLEAN,), capture=[pattern])[1].keys())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_grammar(pattern):
    assert [n for n in ALL if path_match(pattern.split("."), n.split("."))] == EXPECTED[pattern]
    assert _path_match is path_match  # the name the LRP files import is the one matcher
    assert [n for n in ALL if site_match(pattern, n)] == EXPECTED[pattern]


def test_suffixes_are_not_globs():
    assert split_site("blocks.0.mlp:input@2") == ("blocks.0.mlp", ":input@2")
    assert site_match("blocks.*:input", "blocks.0:input") and not site_match("blocks.*", "blocks.0:input")
    assert site_match("**@*", "a.0@*") and not site_match("**@1", "a.0@*")
    assert entry_match(["a", "*", "b"], ("a", "0", "b", "weight")) and not entry_match(["?"], ("head", "bias"))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_functional_call_intervene_and_install_sites(pattern):
    assert _captured(pattern) == sorted(EXPECTED[pattern])
    _, caps = tdfunc.intervene(lambda x: NET(x), NET, capture=[pattern])(CLEAN)
    assert sorted(caps.keys()) == sorted(EXPECTED[pattern])
    tdfunc.install_sites(NET, pattern)
    try:
        assert sorted(n for n, m in NET.named_modules() if n and is_installed(m)) == sorted(EXPECTED[pattern])
    finally:
        assert tdfunc.remove_sites(NET) == len(EXPECTED[pattern])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cache_activations(pattern):
    data = [TensorDict({"input": CLEAN[0]}, batch_size=[3])]
    cache = tdfunc.latent.cache_activations(NET, None, data, pattern, progress=False)
    assert sorted(cache.keys()) == sorted(EXPECTED[pattern])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patch_patching_sweep_and_path_patch(pattern):
    _, caps = tdfunc.functional_call(NET, None, (CLEAN,), capture=["**"])
    tagged = {k: torch.full_like(caps[k], float(i)) for i, k in enumerate(caps.keys())}
    seen = []
    tdfunc.latent.patch(
        NET, None, (CORRUPT,), tagged, pattern, patch_fn=lambda v, c: seen.append(int(c.flatten()[0])) or v
    )
    assert sorted(list(caps.keys())[i] for i in seen) == sorted(EXPECTED[pattern])

    metric = lambda y: y[0, -1, 0]  # noqa: E731
    sweep = tdfunc.latent.patching_sweep(NET, None, (CLEAN,), (CORRUPT,), pattern, metric)
    explicit = tdfunc.latent.patching_sweep(NET, None, (CLEAN,), (CORRUPT,), EXPECTED[pattern], metric)
    assert sweep.shape == (len(EXPECTED[pattern]), 3)
    torch.testing.assert_close(sorted(sweep.tolist()), sorted(explicit.tolist()), rtol=0, atol=0)

    send = "a.0.b" if pattern != "a.*.b" else pattern
    got = tdfunc.latent.path_patch(NET, None, (CLEAN,), (CORRUPT,), send, "head:input", freeze=pattern)
    frozen = [s for s in EXPECTED[pattern] if s not in ("a.0.b",)]
    want = tdfunc.latent.path_patch(
        NET,
        None,
        (CLEAN,),
        (CORRUPT,),
        EXPECTED[send] if send in EXPECTED else send,
        "head:input",
        freeze=frozen or None,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_steer(pattern):
    v = torch.linspace(-1, 1, 4, dtype=torch.float64)
    got = tdfunc.functional_call(NET, None, (CLEAN,), edits=tdfunc.latent.steer({pattern: v}, 0.5))
    want = tdfunc.functional_call(
        NET, None, (CLEAN,), edits=tdfunc.latent.steer({s: v for s in EXPECTED[pattern]}, 0.5)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_weights_select_the_entries_of_the_matched_modules(pattern):
    state = tdfunc.state(NET)
    masks = tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=0.5, include=pattern)
    chosen = sorted(".".join(k) for k in masks.keys(include_nested=True, leaves_only=True))
    want = sorted({f"{m}.{p}" for m in EXPECTED[pattern] for p, _ in NET.get_submodule(m).named_parameters()})
    assert chosen == want
