"""tdfunc demo: capture, activation patching and steering on a small digits CNN.

Run with ``make demo`` (or ``.venv/bin/python demo/demo.py``).  Uses only tdfunc's public API
(``functional_call``, ``state``, ``delta``) plus ``torch.func.vmap``; the model is never modified.
Writes its figures to ``demo/out/`` (``demo.png``, ``ig_maps.png``) with ``tdfunc.plot``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first, so `demo` is this package, not this script

import tdfunc  # noqa: E402
from demo.digits import accuracy, cache_path, train_digits_cnn  # noqa: E402

# Tiny model: one intra-op thread is fastest, and much faster than two on a busy 2-core machine.
torch.set_num_threads(1)
OUT = Path(__file__).resolve().parent / "out"
T0 = time.perf_counter()


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def table(header: list[str], rows: list[list[object]]) -> None:
    """Print a plain text table; floats with 2 decimals."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def run(model: torch.nn.Module, x: torch.Tensor, **kw: object):
    """One tdfunc call with the module's own weights (state=None)."""
    return tdfunc.functional_call(model, None, (x,), **kw)


# ---------------------------------------------------------------------------------------------
section("model")
cached = cache_path().exists()
model, (x_train, y_train, x_test, y_test) = train_digits_cnn(seed=0)
print(
    f"digits CNN ({'loaded from cache' if cached else 'trained'}, {time.perf_counter() - T0:.1f}s): "
    f"{len(x_train)} train / {len(x_test)} test images, test accuracy {accuracy(model, x_test, y_test):.3f}"
)
print("sites:", ", ".join(n for n, _ in model.named_modules() if n and "." in n))

# Snapshot the model so we can show at the end that nothing here touched it.
params_before = {k: v.clone() for k, v in model.state_dict().items()}
grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
with torch.no_grad():
    logits_before = model(x_test)

torch.set_grad_enabled(False)  # the demo needs no autograd; vmap below works without it

# ---------------------------------------------------------------------------------------------
section("1. capture")
logits, caps = run(model, x_test, capture=["features.*", "head.fc1"])
print(
    f"functional_call(model, None, x_test, capture=['features.*', 'head.fc1']) -> logits "
    f"{tuple(logits.shape)}, equal to model(x): {torch.equal(logits, logits_before)}"
)
for site in caps.keys():
    print(f"  {site:16s} {tuple(caps[site].shape)}")

fc1 = caps["head.fc1"]  # (N, 64), pre-ReLU
classes = torch.arange(10)
means = torch.stack([fc1[y_test == c].mean(0) for c in classes])  # (10, 64)
# selectivity of unit u for class c: d' = (mean_c - mean_rest) / pooled std
dprime = torch.stack(
    [
        (fc1[y_test == c].mean(0) - fc1[y_test != c].mean(0))
        / ((fc1[y_test == c].var(0) + fc1[y_test != c].var(0)) / 2).sqrt().clamp_min(1e-6)
        for c in classes
    ]
)  # (10, 64)
top = dprime.max(1)  # most selective unit per class
print("\nhead.fc1 (pre-ReLU): the most class-selective unit of each class, d' = (mean_c - mean_rest) / pooled std")
table(
    ["class", "unit", "d'", "mean | class", "mean | other classes"],
    [
        [str(c), f"u{u}", dprime[c, u].item(), means[c, u].item(), fc1[y_test != c, u].mean().item()]
        for c, u in enumerate(top.indices.tolist())
    ],
)

# Ablate the 3 most selective units for one class two ways: through the weights (a state edit)
# and through the activation (an edit); both are pure and must agree.
c_abl = 3
units = dprime[c_abl].topk(3).indices
state = tdfunc.state(model, copy=True)
state["head", "fc1", "weight"][units] = 0.0
state["head", "fc1", "bias"][units] = 0.0
by_state = tdfunc.functional_call(model, state, (x_test,))
by_edit = run(model, x_test, edits={"head.fc1": lambda v: v.index_fill(-1, units, 0.0)})
sel = y_test == c_abl
recall = lambda lg: (lg[sel].argmax(-1) == c_abl).float().mean().item()  # noqa: E731
others = lambda lg: (lg[~sel].argmax(-1) == y_test[~sel]).float().mean().item()  # noqa: E731
print(
    f"\nablating fc1 units {units.tolist()} (most selective for {c_abl}): recall of {c_abl} "
    f"{recall(logits):.2f} -> {recall(by_edit):.2f}, accuracy on other classes "
    f"{others(logits):.2f} -> {others(by_edit):.2f}"
)
print(
    f"  weight ablation via tdfunc.state == activation ablation via edits: "
    f"{torch.allclose(by_state, by_edit, atol=1e-5)}"
)

# ---------------------------------------------------------------------------------------------
section("2. activation patching")
n_pairs = 500
gen = torch.Generator().manual_seed(0)
ok = (logits.argmax(-1) == y_test).nonzero().squeeze(1)  # correctly classified test images
i_clean = ok[torch.randint(len(ok), (4 * n_pairs,), generator=gen)]
i_corr = ok[torch.randint(len(ok), (4 * n_pairs,), generator=gen)]
keep = (y_test[i_clean] != y_test[i_corr]).nonzero().squeeze(1)[:n_pairs]
x_clean, y_clean = x_test[i_clean[keep]], y_test[i_clean[keep]]
x_corr = x_test[i_corr[keep]]

SITES = ["features.conv1:input", "features.relu1", "features.relu2", "features.pool", "head.fc1"]
_, clean_caps = run(model, x_clean, capture=SITES)


def flip_fraction(site: str, mask: torch.Tensor) -> float:
    """Run the corrupted images with the clean activation patched in where ``mask`` is True."""
    clean = clean_caps[site]
    out = run(model, x_corr, edits={site: lambda v: torch.where(mask, clean, v)})
    return (out.argmax(-1) == y_clean).float().mean().item()


def channel_masks(shape: torch.Size, frac: float, draws: int = 8) -> list[torch.Tensor]:
    n = shape[1]
    masks = []
    for _ in range(draws):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[: max(1, round(frac * n))]] = True
        masks.append(m.view(n, *[1] * (len(shape) - 2)))
    return masks


COLS = ["all", "top rows", "bottom rows", "1/2 ch.", "1/4 ch."]
flip: dict[str, list[float | None]] = {}
for site in SITES:
    shape = clean_caps[site].shape
    row: list[float | None] = [flip_fraction(site, torch.ones((), dtype=torch.bool))]
    if len(shape) == 4:  # (N, C, H, W): spatial halves
        h = shape[2]
        top = (torch.arange(h) < h // 2).view(h, 1)
        row += [flip_fraction(site, top), flip_fraction(site, ~top)]
    else:
        row += [None, None]
    for frac in (0.5, 0.25):
        if shape[1] > 1:
            row.append(sum(flip_fraction(site, m) for m in channel_masks(shape, frac)) / 8)
        else:
            row.append(None)
    flip[site] = row

print(f"{len(y_clean)} pairs (clean digit a, corrupted digit b != a), all correctly classified.")
print("Fraction of corrupted runs whose prediction flips to a when the clean activation is patched")
print("into (part of) a site: all of it, its top / bottom half of rows, or a random half / quarter")
print("of its channels (units for head.fc1; mean of 8 random draws).  'all' is a sanity check (the")
print("net is a chain, so a whole patched site decides the output); the other columns show how spread")
print("out over space and channels the class information is at each depth:")
table(
    ["site", "shape"] + COLS,
    [[s, "x".join(map(str, clean_caps[s].shape[1:]))] + [("-" if v is None else v) for v in flip[s]] for s in SITES],
)

# ---------------------------------------------------------------------------------------------
section("3. steering with tdfunc.delta, vmapped over the scale")
_, train_caps = run(model, x_train, capture=["head.fc1"])
fc1_train = train_caps["head.fc1"]
alphas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])


def steer(alpha: torch.Tensor, xb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return run(model, xb, edits={"head.fc1": tdfunc.delta(alpha * v)})


steer_all = torch.func.vmap(steer, in_dims=(0, None, None))  # one call for every alpha
PAIRS = [(8, 3), (7, 1), (4, 9), (0, 6)]
curves: dict[str, list[float]] = {}
rows = []
max_diff = 0.0
for a, b in PAIRS:
    v = fc1_train[y_train == a].mean(0) - fc1_train[y_train == b].mean(0)
    xb = x_test[y_test == b]
    out = steer_all(alphas, xb, v)  # (len(alphas), N_b, 10)
    loop = torch.stack([steer(al, xb, v) for al in alphas])
    max_diff = max(max_diff, (out - loop).abs().max().item())
    frac = (out.argmax(-1) == a).float().mean(1).tolist()
    curves[f"{b}->{a}"] = frac
    rows.append([f"{b} -> {a}  (v = mean_a - mean_b)", len(xb), *frac])
    # control: a random direction with the same norm
    r = torch.randn(v.shape, generator=gen)
    r = r * v.norm() / r.norm()
    frac_r = (steer_all(alphas, xb, r).argmax(-1) == a).float().mean(1).tolist()
    curves[f"{b}->{a} random"] = frac_r
    rows.append([f"{b} -> {a}  (random, same norm)", len(xb), *frac_r])

print("edits={'head.fc1': tdfunc.delta(alpha * v)} on test images of class b, v = mean fc1(a) - mean fc1(b)")
print("(train set); fraction of them predicted as a, for each alpha:")
table(["b -> a  \\ alpha", "n"] + [f"{al:g}" for al in alphas.tolist()], rows)
print(f"vmap over alpha == python loop over alpha: {max_diff < 1e-5} (max |diff| = {max_diff:.1e})")

# ---------------------------------------------------------------------------------------------
section("4. integrated gradients: every class's map from one path forward")
from tensordict import TensorDict  # noqa: E402

picks = torch.stack([(y_test == c).nonzero()[0, 0] for c in (0, 3, 5, 8)])
td_ig = TensorDict({"x": x_test[picks]}, batch_size=[len(picks)])  # baseline: zeros (a black image)
f_logits = lambda t: run(model, t["x"])  # noqa: E731
t_ig = time.perf_counter()
ig = tdfunc.integrated_gradients(f_logits, td_ig, n_steps=64, return_convergence_delta=True)
t_ig = time.perf_counter() - t_ig
t_loop = time.perf_counter()
per_class = [
    tdfunc.integrated_gradients(lambda t, c=c: f_logits(t)[:, c], td_ig, n_steps=64)["attr", "x"] for c in range(10)
]
t_loop = time.perf_counter() - t_loop
ig_equal = torch.allclose(ig["attr", "x"], torch.stack(per_class, 1), atol=1e-5)
maps = ig["attr", "x"][:, :, 0]  # (4 images, 10 classes, 8, 8)
print(
    f"attr shape {tuple(ig['attr', 'x'].shape)} (images, classes, 1, 8, 8): all 10 classes in {t_ig:.2f}s, "
    f"one call per class {t_loop:.2f}s; equal: {ig_equal}"
)
print(f"completeness: max |sum(attr) - (f(x) - f(0))| = {ig['convergence_delta'].abs().max():.1e}")
for i, c in enumerate((0, 3, 5, 8)):
    totals = maps[i].flatten(1).sum(1)
    print(
        f"  a {c}: sum of the map per class (= logit change from a black image) "
        + " ".join(f"{v:+.1f}" for v in totals.tolist())
    )

# ---------------------------------------------------------------------------------------------
section("5. pruning: 10 sparsity levels evaluated in one vmapped call")
state = tdfunc.state(model)
amounts = [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99]
masks = tdfunc.weights.prune_masks(state, tdfunc.weights.magnitude_scores(state), amount=amounts)  # global, by |w|
pruned_logits = torch.func.vmap(
    lambda m: tdfunc.functional_call(model, tdfunc.weights.apply_masks(state, m), (x_test,))
)(masks)
prune_acc = (pruned_logits.argmax(-1) == y_test).float().mean(-1)
loop_acc = torch.stack(
    [
        (tdfunc.functional_call(model, tdfunc.weights.apply_masks(state, masks[i]), (x_test,)).argmax(-1) == y_test)
        .float()
        .mean()
        for i in range(len(amounts))
    ]
)
prune_equal = torch.equal(prune_acc, loop_acc)
table(["sparsity"] + [f"{a:g}" for a in amounts], [["test accuracy"] + [float(a) for a in prune_acc]])
print(f"one vmapped call == a loop of 10 calls: {prune_equal}; the model's own weights were never touched")

# ---------------------------------------------------------------------------------------------
section("6. the model is untouched")
same_params = all(torch.equal(params_before[k], v) for k, v in model.state_dict().items())
no_grads = all(
    (p.grad is None and g is None) or (p.grad is not None and g is not None and torch.equal(p.grad, g))
    for p, g in zip(model.parameters(), grads_before)
)
same_out = torch.equal(model(x_test), logits_before)
print(f"parameters and buffers bitwise unchanged: {same_params}")
print(f"parameters' .grad unchanged:               {no_grads}")
print(f"plain model(x) bitwise identical to before the tdfunc calls: {same_out}")

# ---------------------------------------------------------------------------------------------
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import tdfunc.plot  # needs matplotlib: pip install 'tdfunc[plot]'

    OUT.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.2), layout="constrained")
    flip_grid = torch.tensor([[float("nan") if v is None else v for v in flip[s]] for s in SITES])  # (sites, parts)
    tdfunc.plot.patching_heatmap(
        flip_grid,
        sites=[s.replace("features.", "").replace("head.", "") for s in SITES],
        units=COLS,
        annotate="{:.2f}",
        ax=ax1,
        title="activation patching: fraction flipped to the clean class",
    )
    names = [k for k in curves if "random" not in k]
    colors = [f"C{k}" for k in range(len(names))]
    tdfunc.plot.sweep_curve(
        alphas,
        {k: curves[k] for k in names},
        colors=colors,
        ax=ax2,
        xlabel="alpha",
        ylabel="fraction predicted as target",
        title="steering head.fc1 with alpha * (mean_a - mean_b)",
    )
    tdfunc.plot.sweep_curve(
        alphas,
        {f"{k} random": curves[f"{k} random"] for k in names},
        colors=colors,
        ax=ax2,
        linestyle="--",
        marker=None,
    )
    ax2.legend(fontsize=7, ncol=2)
    tdfunc.plot.sweep_curve(
        amounts,
        prune_acc,
        ax=ax3,
        xlabel="fraction of weights pruned (global magnitude)",
        ylabel="test accuracy",
        title="pruning sweep: one vmapped call",
    )
    fig.savefig(OUT / "demo.png", dpi=110)
    plt.close(fig)
    print(f"\nfigure: {(OUT / 'demo.png').relative_to(ROOT)}")
    fig, axes = tdfunc.plot.image_attribution_grid(
        ig,
        td_ig["x"],
        key="x",
        outlier_perc=0,
        row_labels=[f"a {int(y_test[i])}" for i in picks],
        col_labels=[f"class {c}" for c in range(10)],
    )
    fig.suptitle("integrated gradients for every class, one call (red: evidence for the class)", fontsize=10)
    fig.savefig(OUT / "ig_maps.png", dpi=110)
    plt.close(fig)
    print(f"figure: {(OUT / 'ig_maps.png').relative_to(ROOT)}")
except ImportError:
    print("\n(matplotlib not installed: no figure)")

print(f"done in {time.perf_counter() - T0:.1f}s")
ok_all = same_params and no_grads and same_out and max_diff < 1e-5 and ig_equal and prune_equal
sys.exit(0 if ok_all else 1)
