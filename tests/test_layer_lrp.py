"""``tdfunc.lrp(..., site=...)``: relevance at a site (captum's ``LayerLRP``).

Checked against captum 0.9.0's own LayerLRP test cases (tests/attr/layer/test_layer_lrp.py: their models, inputs,
expected values and tolerance), captum's LayerLRP run live on the same inputs, and conservation (a bias-free ReLU
net under LRP-0: the relevance at every layer sums to the output).  captum's rules, mapped explicitly: EpsilonRule
(its default on Linear / Conv, eps 1e-9) -> ``epsilon(1e-9)``, GammaRule -> ``gamma``, Alpha1_Beta0_Rule ->
``alpha_beta(1, 0)``; ReLU / Tanh / Dropout cross unchanged in captum (``passthrough()``).
"""

from __future__ import annotations

import re

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdfunc
from tdfunc import AttributionError

captum_attr = pytest.importorskip("captum.attr")
models = pytest.importorskip("captum.testing.helpers.basic_models")
R = tdfunc.lrp_rules
ATOL = 1e-4  # captum's assertTensorAlmostEqual default delta (0.0001), max abs difference


def _captum_rules(eps=1e-9):  # captum's LRP defaults, spelled as tdfunc rules
    return {
        nn.Linear: R.epsilon(eps),
        nn.Conv2d: R.epsilon(eps),
        nn.ReLU: R.passthrough(),
        nn.Tanh: R.passthrough(),
        nn.Dropout: R.passthrough(),
    }


def _simple():
    return models.SimpleLRPModel(False).eval(), torch.tensor([[1.0, 2.0, 3.0]])


def _at(model, x, site, rules, target: int | None = 0):  # None: every class at once
    td = TensorDict({"x": x}, batch_size=[x.shape[0]])
    f = (lambda t: model(t["x"])) if target is None else (lambda t: model(t["x"])[:, target])
    return tdfunc.lrp(f, td, model, rules=rules, composite=None, site=site)["attr"]


def _close(a, b):
    b = b.detach() if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=a.dtype)
    torch.testing.assert_close(a.detach(), b, atol=ATOL, rtol=0)


def test_captum_basic_attributions():  # test_lrp_basic_attributions: conv1's output, target = argmax class
    model, x = models.BasicModel_ConvNet_One_Conv(), torch.arange(16).view(1, 1, 4, 4).float()
    target = int(model(x).argmax(1))
    r = _at(model, x, "conv1", _captum_rules(), target)["conv1"]
    _close(r[0], [[[0, 4], [31, 40]], [[0, 0], [-6, -15]]])
    _close(r.sum(), model(x)[0, target])  # captum's delta 0


def test_captum_simple_attributions_upper_input_is_lower_output():  # test_lrp_simple_attributions (+ inplace)
    model, x = _simple()
    r = _at(model, x, ["linear2:input", "linear"], _captum_rules())
    _close(r["linear2:input"], r["linear"])
    _close(r["linear2:input"].sum(-1), model(x)[:, 0])  # captum's delta 0
    inplace = models.SimpleLRPModel(True).eval()  # passthrough refuses in-place ReLU: its gradient, equal here
    rules = {nn.Linear: R.epsilon(1e-9), nn.Dropout: R.passthrough()}
    _close(_at(inplace, x, "linear2:input", rules)["linear2:input"], r["linear2:input"])


def test_captum_tanh_skipped():  # test_lrp_simple_tanh: tanh passes relevance unchanged
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3, bias=False)
            self.linear.weight.data.fill_(0.1)
            self.tanh = nn.Tanh()
            self.linear2 = nn.Linear(3, 1, bias=False)
            self.linear2.weight.data.fill_(0.1)

        def forward(self, x):
            return self.linear2(self.tanh(self.linear(x)))

    _close(_at(Model(), _simple()[1], "linear", _captum_rules())["linear"][0], [0.0537] * 3)


@pytest.mark.parametrize("name", ["gamma", "alpha1_beta0"])
def test_captum_gamma_and_alpha_beta(name):  # test_lrp_simple_attributions_GammaRule / _AlphaBeta
    model, x = _simple()
    with torch.no_grad():
        model.linear.weight[0][0] = -2
    rules = _captum_rules()
    if name == "gamma":
        rules.update({"linear": R.gamma(1.0, 1e-9), "linear2": R.gamma(0.25, 1e-9)})
    else:
        rules.update({"linear": R.alpha_beta(1.0, 0.0, 1e-9), "linear2": R.alpha_beta(1.0, 0.0, 1e-9)})
    _close(_at(model, x, "linear", rules)["linear"][0], [24.0, 36.0, 36.0])


def test_captum_all_layers_and_delta():  # test_lrp_simple_attributions_all_layers(_delta): several sites, a batch
    model, x = _simple()
    x = torch.cat((x, 2 * x))
    r = _at(model, x, ["linear:input", "linear2:input"], _captum_rules())
    assert set(r.keys()) == {"linear:input", "linear2:input"}
    _close(r["linear:input"], [[18.0, 36.0, 54.0], [36.0, 72.0, 108.0]])
    for s in ("linear:input", "linear2:input"):
        _close(r[s].sum(-1), model(x)[:, 0])


def test_matches_captum_layer_lrp_live_every_class():  # random CNN, every class at once vs captum per target
    torch.manual_seed(0)
    model = models.BasicModel_ConvNet_One_Conv().eval()
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.5
    x = torch.randn(3, 1, 4, 4)
    sites = {"conv1": (model.conv1, False), "fc1:input": (model.fc1, True), "fc1": (model.fc1, False)}
    r = _at(model, x, list(sites), _captum_rules(), None)
    for site, (layer, to_input) in sites.items():
        ref = torch.stack(
            [
                captum_attr.LayerLRP(model, layer).attribute(x, t, attribute_to_layer_input=to_input).detach()
                for t in range(4)
            ],
            1,
        )
        assert r[site].shape == ref.shape
        torch.testing.assert_close(r[site].detach(), ref, atol=1e-5, rtol=1e-5)


def test_conservation_at_every_layer():  # bias-free ReLU net, LRP-0: Σ relevance at any layer = f, per class
    torch.manual_seed(1)
    dt = torch.float64
    net = nn.Sequential(
        nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)
    ).to(dt)
    td = TensorDict({"x": torch.randn(4, 5, dtype=dt)}, batch_size=[4])
    sites = ["0:input", "0", "1", "2:input", "3", "4:input", "4"]
    r = tdfunc.lrp(lambda t: net(t["x"]), td, net, composite="epsilon", rules={nn.Linear: R.epsilon(0.0)}, site=sites)
    y = net(td["x"])
    for s in sites:
        assert r["attr", s].shape == (4, 3) + r["attr", s].shape[2:]
        torch.testing.assert_close(r["attr", s].detach().sum(-1), y.detach())
    x_rel = tdfunc.lrp(lambda t: net(t["x"]), td, net, rules={nn.Linear: R.epsilon(0.0)}, composite="epsilon")
    torch.testing.assert_close(r["attr", "0:input"], x_rel["attr", "x"])  # the first layer's input is the input


def test_first_layer_input_is_lrp_of_the_input_and_output_relevance():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    td = TensorDict({"x": torch.randn(5, 4, dtype=torch.float64)}, batch_size=[5])
    f = lambda t: net(t["x"])
    for kw in ({}, {"output_relevance": lambda y: y * torch.eye(3, dtype=y.dtype)[1]}):
        a = tdfunc.lrp(f, td, net, composite="epsilon", site="0:input", **kw)["attr", "0:input"]
        torch.testing.assert_close(a, tdfunc.lrp(f, td, net, composite="epsilon", **kw)["attr", "x"])


def test_site_errors_are_pinned():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    td = TensorDict({"x": torch.randn(2, 3)}, batch_size=[2])
    f = lambda t: net(t["x"])
    with pytest.raises(tdfunc.SiteError, match=re.escape("tdfunc.lrp: unknown site 'nope'")):
        tdfunc.lrp(f, td, net, site="nope")
    with pytest.raises(AttributionError, match=re.escape("tdfunc.lrp: site '*' names several values")):
        tdfunc.lrp(f, td, net, site="*")
    with pytest.raises(TypeError, match=re.escape("tdfunc.lrp: site must be a site string or a non-empty")):
        tdfunc.lrp(f, td, net, site=[])
    msg = (
        "tdfunc.lrp: in_keys=['x'] and site='0' were both given; with site the relevance is taken at the site, "
        "not at inputs: drop in_keys."
    )
    with pytest.raises(AttributionError, match="^" + re.escape(msg) + "$"):
        tdfunc.lrp(f, td, net, site="0", in_keys=["x"])
    msg = (
        "tdfunc.lrp: check_conservation=True with site='0': the check follows the relevance down to the inputs; "
        "run it on the input attribution (lrp without site)."
    )
    with pytest.raises(AttributionError, match="^" + re.escape(msg) + "$"):
        tdfunc.lrp(f, td, net, site="0", check_conservation=True)
    with pytest.raises(AttributionError, match=re.escape("tdfunc.lrp: site='2' with the rule ")) as e:
        tdfunc.lrp(f, td, net, site="2", composite="epsilon_plus_flat")
    assert "at '0': flat, w² and zᴮ give zero layer inputs relevance through probes" in str(e.value)
