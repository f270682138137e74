"""tdfunc.plot: every function renders to PNG and draws what it says; captum references; errors pinned."""

from __future__ import annotations

import html
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import Normalize, to_hex  # noqa: E402
from tensordict import TensorDict  # noqa: E402

import tdfunc  # noqa: E402
import tdfunc.plot as P  # noqa: E402
from tdfunc.plot import PlotError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def png(fig, tmp_path, name="fig.png", dpi=50):
    """Render to PNG; the file's pixel size is the figure size times dpi."""
    path = tmp_path / name
    fig.savefig(path, dpi=dpi)
    h, w = mpimg.imread(path).shape[:2]
    fw, fh = fig.get_size_inches()
    assert abs(w - fw * dpi) <= 1 and abs(h - fh * dpi) <= 1
    return path


def cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3)
    )


# --------------------------------------------------------------------------------------------- import


def test_tdfunc_does_not_import_plot_and_plot_names_the_extra_without_matplotlib():
    code = (
        "import sys; import tdfunc; assert 'tdfunc.plot' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "sys.modules['matplotlib'] = None\n"
        "try:\n    import tdfunc.plot\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("tdfunc.plot needs matplotlib, which is not installed (")
    assert out.rstrip().endswith("); install the extra: pip install 'tdfunc[plot]'")


# --------------------------------------------------------------------------------------------- images


def test_image_attribution_heat_map_is_centred_sums_channels_and_has_a_colour_bar(tmp_path):
    attr = torch.randn(3, 8, 8)
    fig, ax = P.image_attribution(attr, outlier_perc=0, title="saliency")
    png(fig, tmp_path)
    assert tuple(fig.get_size_inches()) == (4.0, 4.0)
    (im,) = ax.images
    lo, hi = im.get_clim()
    assert lo == -hi == -attr.double().sum(0).abs().max().item()
    np.testing.assert_allclose(im.get_array(), attr.double().sum(0).numpy())
    assert len(fig.axes) == 2 and ax.get_title() == "saliency"  # the colour bar's axes
    assert im.get_cmap().name == "RdBu_r"
    fig, ax = P.image_attribution(attr, colorbar=False, figsize=(3, 2))
    png(fig, tmp_path)
    assert tuple(fig.get_size_inches()) == (3.0, 2.0) and len(fig.axes) == 1 and ax.get_title() == ""


def test_image_attribution_blended_on_given_axes_any_dtype_and_a_tensordict(tmp_path):
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    attr = torch.randn(1, 8, 8, dtype=torch.bfloat16, requires_grad=True) * 1
    image = torch.rand(1, 8, 8, dtype=torch.float16)
    got_fig, got_ax = P.image_attribution(attr, image, method="blended_heat_map", alpha=0.3, ax=axes[1])
    assert got_fig is fig and got_ax is axes[1] and not axes[0].images
    grey, heat = got_ax.images
    assert heat.get_alpha() == 0.3 and grey.get_cmap().name == "gray"
    x = image[0].double()
    np.testing.assert_allclose(grey.get_array(), ((x - x.min()) / (x.max() - x.min())).numpy())
    td = TensorDict({"attr": {"x": attr.detach().float()}}, batch_size=[])
    _, ax2 = P.image_attribution(td, ax=axes[0])
    np.testing.assert_allclose(ax2.images[0].get_array(), heat.get_array())
    png(fig, tmp_path)


@pytest.mark.parametrize(
    "sign, lo, cmap", [("positive", 0.0, "Reds"), ("negative", None, "Blues_r"), ("absolute_value", 0.0, "Purples")]
)
def test_image_attribution_one_sided_signs(sign, lo, cmap, tmp_path):
    attr = torch.randn(8, 8)
    fig, ax = P.image_attribution(attr, sign=sign, outlier_perc=0)
    png(fig, tmp_path)
    im = ax.images[0]
    data = np.asarray(im.get_array())
    ref = {"positive": attr.clamp_min(0), "negative": attr.clamp_max(0), "absolute_value": attr.abs()}[sign]
    np.testing.assert_allclose(data, ref.double().numpy())
    lim = ref.abs().max().item()
    assert im.get_clim() == ((0.0, lim) if sign != "negative" else (-lim, 0.0))
    assert im.get_cmap().name == cmap


def test_masked_image_weights_the_image_by_the_normalised_magnitude(tmp_path):
    attr, image = torch.randn(3, 8, 8), torch.rand(3, 8, 8)
    fig, ax = P.image_attribution(attr, image, method="masked_image", sign="absolute_value", outlier_perc=0)
    png(fig, tmp_path)
    assert len(fig.axes) == 1  # no colour bar for a masked image
    w = P.normalize_attribution(attr.double().sum(0), sign="absolute_value", outlier_perc=0)
    x = image.double().permute(1, 2, 0)
    np.testing.assert_allclose(ax.images[0].get_array(), ((x - x.min()) / (x.max() - x.min()) * w[..., None]).numpy())


# ---------------------------------------------------------------------------------- captum reference


@pytest.mark.parametrize("sign", ["all", "positive", "negative", "absolute_value"])
@pytest.mark.parametrize("outlier_perc", [0, 2, 10.5])
def test_normalisation_equals_captums(sign, outlier_perc):
    viz = pytest.importorskip("captum.attr._utils.visualization")
    rng = np.random.default_rng(0)
    attr = rng.standard_normal((3, 12, 10)) ** 3  # heavy tails: outliers matter
    ref = viz._normalize_attr(attr.sum(0), sign, outlier_perc)
    ours = P.normalize_attribution(torch.from_numpy(attr).sum(0), sign=sign, outlier_perc=outlier_perc)
    np.testing.assert_array_equal(ours.numpy(), ref)
    # what is drawn: captum's visualize_image_attr (HWC) vs ours (CHW), read back from the artists
    _, cax = viz.visualize_image_attr(
        attr.transpose(1, 2, 0), method="heat_map", sign=sign, outlier_perc=outlier_perc, use_pyplot=False
    )
    fig, ax = P.image_attribution(torch.from_numpy(attr).float(), sign=sign, outlier_perc=outlier_perc)
    im = ax.images[0]
    lim = max(abs(v) for v in im.get_clim())
    drawn = np.clip(np.asarray(im.get_array()) / lim, -1, 1)
    drawn = -drawn if sign == "negative" else drawn  # captum shows the negative part's magnitude
    np.testing.assert_allclose(drawn, cax.images[0].get_array(), atol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic", "area"])
def test_upsample_equals_interpolate_and_captums(mode):
    captum_attr = pytest.importorskip("captum.attr")
    cam = torch.randn(2, 3, 1, 4, 5)  # tdfunc.grad_cam: batch x K x 1 x h x w
    up = P.upsample(cam, (8, 15), mode=mode)
    assert up.shape == (2, 3, 1, 8, 15)
    flat = cam.reshape(6, 1, 4, 5)
    torch.testing.assert_close(
        up.reshape(6, 1, 8, 15), torch.nn.functional.interpolate(flat, (8, 15), mode=mode), rtol=0, atol=0
    )
    torch.testing.assert_close(
        up.reshape(6, 1, 8, 15), captum_attr.LayerAttribution.interpolate(flat, (8, 15), mode), rtol=0, atol=0
    )
    assert P.upsample(cam[0, 0, 0].double(), 8).dtype == torch.float64


# ----------------------------------------------------------------------------- grids and Grad-CAM


def test_per_class_grid_from_integrated_gradients(tmp_path):
    net, x = cnn(), torch.rand(2, 1, 6, 6)
    td = TensorDict({"x": x}, batch_size=[2])
    ig = tdfunc.integrated_gradients(lambda t: net(t["x"]), td, n_steps=8)  # (2, 3, 1, 6, 6): every class
    fig, axes = P.image_attribution_grid(ig, x, row_labels=["a", "b"], col_labels=["c0", "c1", "c2"], outlier_perc=0)
    png(fig, tmp_path)
    assert axes.shape == (2, 4)
    assert [a.get_title() for a in axes[0]] == ["", "c0", "c1", "c2"] and axes[1, 0].get_ylabel() == "b"
    maps = ig["attr", "x"].detach().double().sum(2)
    lim = maps.abs().max().item()
    for i in range(2):
        assert axes[i, 0].images[0].get_cmap().name == "gray"  # the input
        for k in range(3):
            im = axes[i, k + 1].images[0]
            assert im.get_clim() == (-lim, lim)  # one scale, centred
            np.testing.assert_allclose(im.get_array(), maps[i, k].numpy())
    assert len(fig.axes) == 9  # 8 panels and one colour bar
    fig, axes = P.image_attribution_grid(ig["attr", "x"], shared=False, colorbar=False)
    png(fig, tmp_path)
    assert axes.shape == (2, 3) and len(fig.axes) == 6
    assert {a.images[0].get_clim() for a in axes.flat} == {(-1.0, 1.0)}


def test_grad_cam_overlay_upsamples_a_tdfunc_grad_cam_result(tmp_path):
    net, x = cnn(), torch.rand(2, 1, 6, 6)
    td = TensorDict({"x": x}, batch_size=[2])
    cam = tdfunc.grad_cam(lambda t: net(t["x"]), td, net, "1")  # (2, 3, 1, 6, 6)
    small = cam["attr", "1"][1, 2, :, ::2, ::2].detach()  # a coarse (1, 3, 3) map
    fig, ax = P.grad_cam_overlay(small, x[1], mode="nearest", sign="all")
    png(fig, tmp_path)
    grey, heat = ax.images
    np.testing.assert_allclose(heat.get_array(), P.upsample(small.double(), (6, 6), mode="nearest")[0].numpy())
    assert heat.get_clim()[0] == -heat.get_clim()[1]
    one = tdfunc.grad_cam(lambda t: net(t["x"])[:, 2], td, net, "1")  # class 2 only: (2, 1, 6, 6)
    _, ax = P.grad_cam_overlay(one[1], x[1])  # a TensorDict; default: positive part, bilinear
    assert ax.images[1].get_clim()[0] == 0.0
    np.testing.assert_allclose(
        ax.images[1].get_array(), cam["attr", "1"][1, 2, 0].detach().double().clamp_min(0), rtol=1e-6
    )


# ------------------------------------------------------------------------------------------ tokens


def test_token_figure_colours_wraps_and_grows(tmp_path):
    tokens = ["The", " capital", " of", " $France$", "\n", " is"]
    scores = torch.tensor([0.5, -2.0, 0.0, 1.0, 0.25, -0.5], dtype=torch.float16)
    fig, ax = P.token_attribution(tokens, scores)
    png(fig, tmp_path)
    assert fig.get_size_inches()[0] == 8.0
    assert [t.get_text() for t in ax.texts] == ["The", " capital", " of", " $France$", "\\n", " is"]
    assert not any(t.get_parse_math() for t in ax.texts)
    cm, norm = colormaps["RdBu_r"], Normalize(-2.0, 2.0)
    for t, v in zip(ax.texts, scores.tolist()):
        assert to_hex(t.get_bbox_patch().get_facecolor()) == to_hex(cm(norm(v)))
    assert to_hex(ax.texts[2].get_bbox_patch().get_facecolor()) == to_hex(cm(0.5))  # zero is the middle
    long_fig, long_ax = P.token_attribution(tokens * 12, torch.randn(72), width=4, title="IG")
    png(long_fig, tmp_path, "long.png")
    assert long_fig.get_size_inches()[1] > fig.get_size_inches()[1] and long_ax.get_title() == "IG"
    r = long_fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in long_ax.texts]
    assert max(b.x1 for b in boxes) <= long_fig.bbox.width and min(b.y0 for b in boxes) >= 0  # wrapped, inside
    assert len({round(b.y0) for b in boxes}) > 3  # several lines


def test_token_figure_on_given_axes_with_colour_bar_and_embedding_scores(tmp_path):
    fig, ax = plt.subplots(figsize=(6, 2))
    got, _ = P.token_attribution(["a", "b"], torch.randn(2, 16), ax=ax, colorbar=True)  # (T, D): summed
    png(fig, tmp_path)
    assert got is fig and len(fig.axes) == 2 and len(ax.texts) == 2


def test_token_html_escapes_and_colours():
    tokens = ["<b>", " & ", '"q"', " Paris"]
    scores = torch.tensor([1.0, -1.0, 0.0, 0.5])
    page = P.token_attribution_html(tokens, scores)
    assert isinstance(page, P.TokenHTML) and isinstance(page, str) and page._repr_html_() == page
    assert "<b>" not in page and page.count("<span") == 4
    cm = colormaps["RdBu_r"]
    for tok, v in zip(tokens, scores.tolist()):
        assert f">{html.escape(tok)}</span>" in page
        assert f"background-color:{to_hex(cm((v + 1) / 2))}" in page
        assert f'title="{v:.4g}"' in page
    td = TensorDict({"attr": {"embeds": scores[:, None].repeat(1, 3)}}, batch_size=[])
    assert P.token_attribution_html(tokens, td) == P.token_attribution_html(tokens, 3 * scores)


# ------------------------------------------------------------------------------------------ latent


def test_patching_heatmap_of_a_patching_sweep(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    sites, tokens = ["0", "1", "2"], ["The", " cat", " sat", " on", " $x"]
    r = tdfunc.latent.patching_sweep(net, None, (clean,), (corrupt,), sites, lambda y: y[0, -1, 0]).detach()
    fig, ax = P.patching_heatmap(
        r, sites=["block 0", "relu", "head"], units=tokens, xlabel="position", annotate="{:.1f}"
    )
    png(fig, tmp_path)
    im = ax.images[0]
    assert im.get_clim() == (-r.abs().max().item(), r.abs().max().item())
    np.testing.assert_allclose(im.get_array(), r.double().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["block 0", "relu", "head"]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens and ax.get_xlabel() == "position"
    assert [t.get_text() for t in ax.texts] == [f"{v:.1f}" for v in r.flatten().tolist()]
    assert len(fig.axes) == 2
    fig, ax = P.patching_heatmap(r, sites=sites, units=tokens, transpose=True, colorbar=False, figsize=(3, 4))
    png(fig, tmp_path)
    assert tuple(fig.get_size_inches()) == (3.0, 4.0) and ax.images[0].get_array().shape == (5, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == sites and not ax.texts and len(fig.axes) == 1
    nan = r.clone()
    nan[0, 0] = float("nan")
    _, ax = P.patching_heatmap(nan)
    assert ax.images[0].get_clim()[1] == nan[torch.isfinite(nan)].abs().max().item()


def test_probe_accuracy_by_layer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=gen)
    acts = TensorDict({"emb": torch.randn(80, 4, generator=gen), "h.0": x, "h.1": 2 * x}, batch_size=[])
    y = (x[:, 0] > 0).long()
    out = tdfunc.latent.fit_probes(acts, y, steps=30, lr=0.1, generator=gen)
    fig, ax = P.probe_accuracy(out, chance=0.5, labels=["emb", "0", "1"], title="probe")
    png(fig, tmp_path)
    assert tuple(fig.get_size_inches()) == (8.0, 3.0)
    train, test, chance = ax.get_lines()
    assert (train.get_label(), test.get_label(), chance.get_label()) == ("train", "test", "chance")
    assert list(test.get_ydata()) == [out["test", s, "accuracy"].item() for s in ["emb", "h.0", "h.1"]]
    assert list(chance.get_ydata()) == [0.5, 0.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["emb", "0", "1"] and ax.get_ylabel() == "accuracy"
    _, ax = P.probe_accuracy(out, splits=("test",), sites=["h.1", "h.0"], metric="loss", tick_every=2)
    assert len(ax.get_lines()) == 1 and [t.get_text() for t in ax.get_xticklabels()] == ["h.1"]
    sk = tdfunc.latent.fit_sklearn_probes(acts, y, random_state=0)
    _, ax = P.probe_accuracy(sk)
    assert len(ax.get_lines()) == 2


def test_sweep_curve(tmp_path):
    scales = torch.linspace(-2, 2, 5)
    fig, ax = P.sweep_curve(
        scales,
        {"v": 2 * scales, "random": torch.zeros(5)},
        baseline=0.5,
        baseline_label="no steering",
        colors=["C0", "C3"],
        xlabel="scale",
        ylabel="logit diff",
    )
    png(fig, tmp_path)
    v, rnd, base = ax.get_lines()
    assert list(v.get_xdata()) == scales.tolist() and list(v.get_ydata()) == (2 * scales).tolist()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["v", "random", "no steering"]
    assert to_hex(rnd.get_color()) == to_hex("C3") and list(base.get_ydata()) == [0.5, 0.5]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("scale", "logit diff")
    _, ax = P.sweep_curve([0.0, 0.5, 0.9], torch.rand(2, 3), labels=["a", "b"], linestyle="--", marker=None)
    assert [line.get_linestyle() for line in ax.get_lines()] == ["--", "--"]
    _, ax = P.sweep_curve([0.0, 0.5], [1, 2])
    assert ax.get_legend() is None and len(ax.get_lines()) == 1


# ------------------------------------------------------------------------------------------ errors

IMG = torch.randn(3, 8, 8)
IG = TensorDict({"attr": {"x": torch.randn(8, 8), "y": torch.randn(8, 8)}}, batch_size=[])

PINNED = [
    (
        lambda: P.image_attribution(torch.randn(2, 1, 8, 8)),
        PlotError,
        "tdfunc.plot.image_attribution: attr has shape (2, 1, 8, 8) (4 dims); give one map of shape (H, W) or (C, H, W) "
        "(channels are summed over channel_dim): index one example (and class) first, e.g. attr[0].",
    ),
    (
        lambda: P.image_attribution([[1.0]]),
        TypeError,
        "tdfunc.plot.image_attribution: attr is a list; give a torch.Tensor (any device and dtype).",
    ),
    (
        lambda: P.image_attribution(IMG, sign="pos"),
        PlotError,
        "tdfunc.plot.image_attribution: unknown sign 'pos'; give one of 'all', 'positive', 'negative', 'absolute_value'."
        " Did you mean 'positive'?",
    ),
    (
        lambda: P.image_attribution(IMG, method="blend"),
        PlotError,
        "tdfunc.plot.image_attribution: unknown method 'blend'; give one of 'heat_map', 'blended_heat_map', "
        "'masked_image'.",
    ),
    (
        lambda: P.image_attribution(IMG, sign=1),
        TypeError,
        "tdfunc.plot.image_attribution: sign is a int; give one of 'all', 'positive', 'negative', 'absolute_value'.",
    ),
    (
        lambda: P.image_attribution(IMG, IMG, method="masked_image"),
        PlotError,
        "tdfunc.plot.image_attribution: method='masked_image' weights the image by the attribution's magnitude, which "
        "sign='all' does not give; use sign='positive', 'negative' or 'absolute_value'.",
    ),
    (
        lambda: P.image_attribution(IMG, method="blended_heat_map"),
        PlotError,
        "tdfunc.plot.image_attribution: method='blended_heat_map' draws over the image, but image is None; pass image= "
        "or use method='heat_map'.",
    ),
    (
        lambda: P.image_attribution(IMG, torch.rand(3, 16, 16), method="blended_heat_map"),
        PlotError,
        "tdfunc.plot.image_attribution: image is 16x16 but the attribution is 8x8; give maps of the image's size "
        "(coarse maps: tdfunc.plot.upsample(attr, (16, 16))).",
    ),
    (
        lambda: P.image_attribution(IMG, torch.rand(2, 8, 8), method="blended_heat_map"),
        PlotError,
        "tdfunc.plot.image_attribution: image has 2 channels (shape (2, 8, 8)); give 1 or 3 channels along "
        "channel_dim, or an (H, W) image.",
    ),
    (
        lambda: P.image_attribution(IMG, outlier_perc=100),
        PlotError,
        "tdfunc.plot.image_attribution: outlier_perc=100 is outside [0, 100); give the percentage of the total "
        "|attribution| to saturate (0: scale to the largest value).",
    ),
    (
        lambda: P.image_attribution(IMG, alpha=2.0, method="blended_heat_map", image=IMG),
        PlotError,
        "tdfunc.plot.image_attribution: alpha=2.0; give the heat map's opacity in [0, 1].",
    ),
    (
        lambda: P.image_attribution(IMG, channel_dim=3),
        PlotError,
        "tdfunc.plot.image_attribution: channel_dim=3 is outside [-3, 2]; give the channel dim of a (C, H, W) map (0) "
        "or of an (H, W, C) map (-1).",
    ),
    (
        lambda: P.image_attribution(torch.tensor([[float("nan"), 1.0]])),
        PlotError,
        "tdfunc.plot.image_attribution: the attribution has 1 non-finite values (nan or inf); replace them first, e.g. "
        "with torch.nan_to_num(attr).",
    ),
    (
        lambda: P.image_attribution(IG),
        PlotError,
        "tdfunc.plot.image_attribution: attr holds attributions for ['x', 'y']; pick one with key=.",
    ),
    (
        lambda: P.image_attribution(IG, key="z"),
        PlotError,
        "tdfunc.plot.image_attribution: key='z' is not in attr (it holds attributions for ['x', 'y']).",
    ),
    (
        lambda: P.image_attribution(TensorDict({"x": IMG}, batch_size=[])),
        PlotError,
        "tdfunc.plot.image_attribution: attr holds no ('attr', key) entry (keys: ['x']); give the result of a tdfunc "
        "attribution method or a tensor.",
    ),
    (
        lambda: P.image_attribution(IMG, key="x"),
        TypeError,
        "tdfunc.plot.image_attribution: key='x' is only for a TensorDict result, but attr is a Tensor; drop key=.",
    ),
    (
        lambda: P.image_attribution(IMG, ax="left"),
        TypeError,
        "tdfunc.plot.image_attribution: ax is a str; give a matplotlib Axes (or None for a new figure).",
    ),
    (
        lambda: P.image_attribution_grid(IMG),
        PlotError,
        "tdfunc.plot.image_attribution_grid: attr has shape (3, 8, 8) (3 dims); give (B, K, C, H, W) or (B, K, H, W): "
        "examples x classes (one class: attr.unsqueeze(1)).",
    ),
    (
        lambda: P.image_attribution_grid(torch.randn(2, 3, 8, 8), torch.rand(3, 8, 8)),
        PlotError,
        "tdfunc.plot.image_attribution_grid: images has shape (3, 8, 8) but attr holds 2 examples; give (2, H, W) or "
        "(2, C, H, W).",
    ),
    (
        lambda: P.image_attribution_grid(torch.randn(2, 3, 8, 8), col_labels=["a", "b"]),
        PlotError,
        "tdfunc.plot.image_attribution_grid: col_labels has 2 labels but there are 3 classs; give one label per class.",
    ),
    (
        lambda: P.image_attribution_grid(torch.randn(2, 3, 8, 8), row_labels="ab"),
        TypeError,
        "tdfunc.plot.image_attribution_grid: row_labels is a str; give a list of 2 strings (one per example).",
    ),
    (
        lambda: P.image_attribution_grid(torch.randn(2, 3, 8, 8), axes=plt.subplots(2, 2)[1]),
        PlotError,
        "tdfunc.plot.image_attribution_grid: axes must be 6 matplotlib Axes (2 rows x 3 columns); give "
        "plt.subplots(2, 3)[1] or None.",
    ),
    (
        lambda: P.grad_cam_overlay(torch.randn(2, 4, 4), IMG),
        PlotError,
        "tdfunc.plot.grad_cam_overlay: cam has shape (2, 4, 4); give one map (h, w) or (1, h, w): index one example "
        "(and class) of tdfunc.grad_cam's result first, e.g. cam[0, k].",
    ),
    (
        lambda: P.grad_cam_overlay(torch.randn(4, 4), IMG, mode="linear"),
        PlotError,
        "tdfunc.plot.grad_cam_overlay: unknown mode 'linear'; give one of 'bilinear', 'nearest', 'bicubic', 'area'. "
        "Did you mean 'bilinear', 'nearest'?",
    ),
    (
        lambda: P.upsample(torch.randn(4), 8),
        PlotError,
        "tdfunc.plot.upsample: x has shape (4,); give maps with at least 2 dims (..., h, w).",
    ),
    (
        lambda: P.upsample(torch.ones(4, 4, dtype=torch.long), 8),
        TypeError,
        "tdfunc.plot.upsample: x is a torch.int64 tensor; give a floating-point torch.Tensor (e.g. x.float()).",
    ),
    (
        lambda: P.upsample(torch.randn(4, 4), (8, 0)),
        PlotError,
        "tdfunc.plot.upsample: size=(8, 0); give (H, W) as two positive ints, e.g. image.shape[-2:].",
    ),
    (
        lambda: P.normalize_attribution(IMG, sign="abs"),
        PlotError,
        "tdfunc.plot.normalize_attribution: unknown sign 'abs'; give one of 'all', 'positive', 'negative', "
        "'absolute_value'.",
    ),
    (
        lambda: P.token_attribution(["a", "b"], torch.randn(3)),
        PlotError,
        "tdfunc.plot.token_attribution: 2 tokens but 3 scores; give one score per token (same length, e.g. tokens of "
        "the same input_ids the attribution was computed for).",
    ),
    (
        lambda: P.token_attribution("ab", torch.randn(2)),
        TypeError,
        "tdfunc.plot.token_attribution: tokens is a str; give a list of strings (one per position), e.g. "
        "[tok.decode(i) for i in input_ids[0]].",
    ),
    (
        lambda: P.token_attribution(["a"], torch.randn(1, 1, 4)),
        PlotError,
        "tdfunc.plot.token_attribution: scores has shape (1, 1, 4); give one score per token (T,) or (T, D) (summed "
        "over D): index one example first, e.g. scores[0].",
    ),
    (
        lambda: P.token_attribution_html(["a"], torch.randn(1), cmap="nope"),
        PlotError,
        "tdfunc.plot.token_attribution_html: unknown cmap 'nope'; give a matplotlib colour map name (e.g. 'RdBu_r') "
        "or a Colormap.",
    ),
    (
        lambda: P.token_attribution_html(["a", "b"], torch.randn(3)),
        PlotError,
        "tdfunc.plot.token_attribution_html: 2 tokens but 3 scores; give one score per token (same length, e.g. "
        "tokens of the same input_ids the attribution was computed for).",
    ),
    (
        lambda: P.patching_heatmap(torch.randn(2, 3, 4)),
        PlotError,
        "tdfunc.plot.patching_heatmap: result has shape (2, 3, 4) (3 dims); give (n_sites, n_units) as "
        "tdfunc.latent.patching_sweep returns (one sweep: r.view(1, -1)).",
    ),
    (
        lambda: P.patching_heatmap(torch.randn(2, 3), units=["a", "b"]),
        PlotError,
        "tdfunc.plot.patching_heatmap: units has 2 labels but there are 3 units; give one label per unit.",
    ),
    (
        lambda: P.patching_heatmap(torch.randn(2, 3), annotate=2),
        TypeError,
        "tdfunc.plot.patching_heatmap: annotate is a int; give True or a format string like '{:.2f}'.",
    ),
    (
        lambda: P.probe_accuracy({"test": {}}),
        TypeError,
        "tdfunc.plot.probe_accuracy: result is a dict; give the TensorDict of tdfunc.latent.fit_probes (or "
        "fit_sklearn_probes).",
    ),
    (
        lambda: P.probe_accuracy(TensorDict({"test": {"h.0": {"accuracy": torch.tensor(1.0)}}}, []), splits=["tst"]),
        PlotError,
        "tdfunc.plot.probe_accuracy: the result holds no split 'tst' (it holds ['test']); give splits from "
        "those. Did you mean 'test'?",
    ),
    (
        lambda: P.probe_accuracy(
            TensorDict({"test": {"h.0": {"accuracy": torch.tensor(1.0)}}}, []), splits=["test"], sites=["h.1"]
        ),
        PlotError,
        "tdfunc.plot.probe_accuracy: the result holds no site 'h.1' under 'test' (sites: ['h.0']). Did you mean 'h.0'?",
    ),
    (
        lambda: P.probe_accuracy(
            TensorDict({"test": {"h.0": {"accuracy": torch.tensor(1.0)}}}, []), splits=["test"], metric="f1"
        ),
        PlotError,
        "tdfunc.plot.probe_accuracy: the result holds no metric 'f1' for 'test'/'h.0' (metrics: "
        "['accuracy']); give one of those.",
    ),
    (
        lambda: P.sweep_curve(torch.arange(3), torch.arange(4)),
        PlotError,
        "tdfunc.plot.sweep_curve: curve 0 has shape (4,) but x has 3 values; give 3 values per curve.",
    ),
    (
        lambda: P.sweep_curve(torch.arange(3), "abc"),
        TypeError,
        "tdfunc.plot.sweep_curve: y is a str; give a torch.Tensor or a sequence of numbers.",
    ),
    (
        lambda: P.sweep_curve([1, 2], [[1, 2]], colors=["C0", "C1"]),
        PlotError,
        "tdfunc.plot.sweep_curve: colors=['C0', 'C1'] does not give one colour per curve (1); give a list of 1 "
        "matplotlib colours or None.",
    ),
]


@pytest.mark.parametrize("call, error, message", PINNED, ids=range(len(PINNED)))
def test_error_messages(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message
    if error is PlotError:
        assert isinstance(info.value, tdfunc.TdfuncError) and isinstance(info.value, ValueError)
