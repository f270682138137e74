"""Composition-table rows for the noise tunnel (smooth_grad) and guided backprop.

Noise is passed in as data (``noise=`` standard-normal draws, vmapped with the examples or
shared): a ``torch.Generator`` cannot be traced by ``torch.compile`` (dynamo: "Failed to convert
args/kwargs to proxy"; one created inside the region: "An opaque object was created in the
middle of the program"), and a random draw under the table's ``vmap`` raises "vmap: called random
operation while in randomness error mode".  So draw outside (``torch.randn(..., generator=g)``)
and pass ``noise=``; ``tests/test_attribution_noise_guided.py`` checks that this equals the
generator path bit for bit.
"""

from __future__ import annotations

import torch
from compose_case import B, Case
from models import CNN, MLP
from tensordict import TensorDict
from torch import nn

import tdfunc


class ReluTanhMLP(nn.Module):
    """ReLU then Tanh: the guided map depends smoothly on x and the weights (meaningful double backward)."""

    def __init__(self, d_in=5, d_hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.relu(self.fc1(x)))))


def cases() -> list[Case]:
    torch.manual_seed(0)
    dt = torch.float64
    S = 3  # noise samples
    mlp = MLP().to(dt)
    s_mlp = tdfunc.state(mlp)
    net = lambda x: tdfunc.functional_call(mlp, s_mlp, (x,))
    x6 = torch.randn(B, 6, dtype=dt)
    eps6 = torch.randn(B, S, 1, 6, dtype=dt)  # per example: (S, *x.shape) with x of shape (1, 6)
    rows = []

    def sg_saliency_k(x, eps):  # every class; noise vmapped with the examples
        td = TensorDict({"x": x[None]}, batch_size=[1])
        out = tdfunc.smooth_grad(
            tdfunc.saliency, lambda t: net(t["x"]), td, nt_samples=S, stdevs=0.2, noise=eps, abs=False
        )
        return out["attr", "x"][0].flatten()

    rows.append(Case("noise:smoothgrad-saliency-K", mlp, sg_saliency_k, (x6, eps6), (0, 0), (0,), "fc1", probe=x6))

    labels = torch.tensor([2, 0, 1])
    base6 = 0.1 * torch.randn(B, 6, dtype=dt)

    def vargrad_ig(x, base, eps, label):  # baseline not perturbed; multiply_by_inputs uses the noisy x
        td = TensorDict({"x": x[None], ("baseline", "x"): base[None]}, batch_size=[1])
        f = lambda t: net(t["x"]).gather(-1, label.view(1, 1))[:, 0]
        out = tdfunc.smooth_grad(
            tdfunc.integrated_gradients,
            f,
            td,
            nt_type="vargrad",
            nt_samples=S,
            stdevs=0.3,
            noise=eps,
            n_steps=2,
            return_convergence_delta=True,
        )
        return torch.cat([out["attr", "x"].flatten(), out["convergence_delta"].flatten()])

    rows.append(
        Case(
            "noise:vargrad-ig-delta", mlp, vargrad_ig, (x6, base6, eps6, labels), (0, 0, 0, 0), (0, 1), "fc2", probe=x6
        )
    )

    rmlp = ReluTanhMLP().to(dt)
    s_r = tdfunc.state(rmlp)
    x5 = torch.randn(B, 5, dtype=dt)
    eps5 = torch.randn(S, 2, 5, dtype=dt)
    onehot = torch.eye(3, dtype=dt)

    def sgsq_ixg_chunks(x, w):  # vmap over targets, two chunks of samples, noise shared by the examples
        td = TensorDict({"x": torch.stack([x, -x])}, batch_size=[2])
        f = lambda t: tdfunc.functional_call(rmlp, s_r, (t["x"],)) @ w
        out = tdfunc.smooth_grad(
            tdfunc.input_x_gradient, f, td, nt_type="smoothgrad_sq", nt_samples=S, stdevs=0.5, noise=eps5, chunk_size=2
        )
        return out["attr", "x"].flatten()

    rows.append(
        Case(
            "noise:smoothgrad_sq-ixg-chunks", rmlp, sgsq_ixg_chunks, (x5[0], onehot), (None, 0), (0, 1), "fc2", probe=x5
        )
    )

    def guided_targets(x, w):  # vmap over targets: f closes over a one-hot target weight vector
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.guided_backprop(lambda t: tdfunc.functional_call(rmlp, s_r, (t["x"],)) @ w, td, rmlp)[
            "attr", "x"
        ][0].flatten()

    rows.append(Case("guided:mlp-targets", rmlp, guided_targets, (x5[0], onehot), (None, 0), (0,), "relu", probe=x5))

    def guided_weights(x, weight):  # d(guided map)/d(fc1 weight): double backward through the guided ReLU
        state = s_r.update({("fc1", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.guided_backprop(lambda t: tdfunc.functional_call(rmlp, state, (t["x"],)), td, rmlp)["attr", "x"][
            0
        ].flatten()

    rows.append(
        Case(
            "guided:mlp-K-weights",
            rmlp,
            guided_weights,
            (x5, s_r["fc1", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc1",
            probe=x5,
        )
    )

    cnn = CNN(c=2, n_cls=3).to(dt).eval()
    s_cnn = tdfunc.state(cnn)
    img = torch.randn(B, 1, 4, 4, dtype=dt)

    def guided_cnn(x, weight):  # conv + eval BatchNorm + in-place ReLU called twice + pooling, every class
        state = s_cnn.update({("conv2", "weight"): weight}, inplace=False)
        td = TensorDict({"img": x[None]}, batch_size=[1])
        return tdfunc.guided_backprop(lambda t: tdfunc.functional_call(cnn, state, (t["img"],)), td, cnn)[
            "attr", "img"
        ][0].flatten()

    rows.append(
        Case(
            "guided:cnn-K-weights",
            cnn,
            guided_cnn,
            (img, s_cnn["conv2", "weight"].clone()),
            (0, None),
            (1,),
            "conv2",
            probe=img,
        )
    )

    def deconv_weights(x, weight):  # deconvolution: relu(g) at the ReLU, the Tanh after it keeps the map x-dependent
        state = s_r.update({("fc2", "weight"): weight}, inplace=False)
        td = TensorDict({"x": x[None]}, batch_size=[1])
        return tdfunc.deconvolution(lambda t: tdfunc.functional_call(rmlp, state, (t["x"],)), td, rmlp)["attr", "x"][
            0
        ].flatten()

    rows.append(
        Case(
            "deconv:mlp-K-weights",
            rmlp,
            deconv_weights,
            (x5, s_r["fc2", "weight"].clone()),
            (0, None),
            (0, 1),
            "fc1",
            probe=x5,
        )
    )

    def ggc_cnn(x):  # guided backprop x upsampled Grad-CAM at conv2 (in-place ReLU reused), every class
        td = TensorDict({"img": x[None]}, batch_size=[1])
        f = lambda t: tdfunc.functional_call(cnn, s_cnn, (t["img"],))
        return tdfunc.guided_grad_cam(f, td, cnn, "pool", interpolate_mode="bilinear")["attr", "img"][0].flatten()

    rows.append(Case("guided_grad_cam:cnn-K", cnn, ggc_cnn, (img,), (0,), (0,), "conv2", probe=img))
    return rows
