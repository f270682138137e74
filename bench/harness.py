"""A small benchmark harness: correctness first, then interleaved timing.

Typical use inside a benchmark module::

    from bench.harness import Bench

    def run(device="cpu", quick=False):
        b = Bench("call", device=device, quick=quick)
        variants = {"plain": lambda: model(x), "torch.func": lambda: fc(model, p, (x,))}
        b.check_equal({k: f() for k, f in variants.items()}, atol=1e-6, rtol=1e-5)
        b.time("B=1", variants, reference="torch.func", also_vs=["plain"])
        return b.rows

Timing protocol (``time_interleaved``): all variants run in one process,
round-robin. Each round runs every variant once (one *sample*, ``number``
calls timed together and divided by ``number``) in an order shuffled with a
fixed seed, so drift (thermal, other tenants on a shared machine, allocator
state) is spread over all variants instead of landing on whichever ran last.
``warmup`` rounds are run and discarded first. The garbage collector is
disabled while a sample is being timed and run between rounds. On CUDA the
device is synchronised before the clock starts and before it stops.

Reported per variant: median and inter-quartile range (q1, q3) in ms, and the
ratio of its median to the reference's median (and to any ``also_vs``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THREADS_ENV = "TDFUNC_BENCH_THREADS"
NOISY_IQR = 0.5  # a case whose IQR exceeds this fraction of its median is flagged in the markdown


# --------------------------------------------------------------------------- correctness


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten tensors / (nested) tuples, lists, dicts and TensorDicts into {path: leaf}."""
    try:
        from tensordict import TensorDictBase
    except ImportError:  # pragma: no cover
        TensorDictBase = ()  # type: ignore[assignment]
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if TensorDictBase and isinstance(value, TensorDictBase):
        out: dict[str, Any] = {}
        for key, leaf in value.items(include_nested=True, leaves_only=True):
            name = ".".join(key) if isinstance(key, tuple) else key
            out[f"{prefix}/{name}" if prefix else name] = leaf
        return out
    if isinstance(value, Mapping):
        out = {}
        for key, leaf in value.items():
            out.update(_flatten(leaf, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, leaf in enumerate(value):
            out.update(_flatten(leaf, f"{prefix}/{i}" if prefix else str(i)))
        return out
    return {prefix: value}


def check_equal(results: Mapping[str, Any], atol: float = 1e-6, rtol: float = 1e-5) -> float:
    """Raise ``AssertionError`` unless every variant's result equals the first one's.

    ``results`` maps variant name -> result (a tensor, or a nested tuple / list /
    dict / TensorDict of tensors; structures must have the same leaves).
    Returns the largest absolute difference seen.
    """
    if len(results) < 2:
        return 0.0
    items = list(results.items())
    ref_name, ref = items[0]
    ref_flat = _flatten(ref)
    worst = 0.0
    for name, value in items[1:]:
        flat = _flatten(value)
        if set(flat) != set(ref_flat):
            raise AssertionError(
                f"{name!r} and {ref_name!r} return different structures: {sorted(flat)} vs {sorted(ref_flat)}"
            )
        for key, expected in ref_flat.items():
            actual = flat[key]
            where = f"{name!r} vs {ref_name!r} at {key or '<root>'!r}"
            if isinstance(expected, torch.Tensor):
                if not isinstance(actual, torch.Tensor):
                    raise AssertionError(f"{where}: {type(actual).__name__} is not a tensor")
                if actual.shape != expected.shape:
                    raise AssertionError(f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
                a = actual.detach().to("cpu", torch.float64)
                e = expected.detach().to("cpu", torch.float64)
                diff = float((a - e).abs().max()) if a.numel() else 0.0
                worst = max(worst, diff)
                if not torch.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True):
                    raise AssertionError(f"{where}: max |diff| = {diff:.3g} (atol={atol}, rtol={rtol})")
            elif actual != expected:
                raise AssertionError(f"{where}: {actual!r} != {expected!r}")
    return worst


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    variant: str
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3_ms(self) -> float:
        return _quantile(self.samples_ms, 0.75)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 50,
    warmup: int = 5,
    number: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_seconds: float | None = None,
    min_rounds: int = 5,
) -> dict[str, Timing]:
    """Time zero-argument callables round-robin; return {name: Timing}.

    Each round runs every variant once, in an order shuffled with ``seed``; one
    sample = ``number`` back-to-back calls, reported per call in ms. With
    ``max_seconds``, timing stops after the first complete round that ends past
    the budget (but not before ``min_rounds`` timed rounds), so a busy machine
    gives fewer rounds instead of a run that never ends.
    """
    names = list(variants)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    perf = time.perf_counter
    gc_was_enabled = gc.isenabled()
    start = perf()
    try:
        for r in range(warmup + rounds):
            if max_seconds is not None and r >= warmup + min_rounds and perf() - start > max_seconds:
                break
            order = names[:]
            rng.shuffle(order)
            gc.collect()
            for name in order:
                fn = variants[name]
                _sync(device)
                gc.disable()
                t0 = perf()
                for _ in range(number):
                    fn()
                _sync(device)
                t1 = perf()
                if gc_was_enabled:
                    gc.enable()
                if r >= warmup:
                    samples[name].append((t1 - t0) * 1e3 / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: Timing(n, samples[n]) for n in names}


def calibrate_number(fn: Callable[[], Any], device: str | torch.device = "cpu", target_ms: float = 2.0) -> int:
    """How many back-to-back calls make one sample last about ``target_ms``."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    dt = (time.perf_counter() - t0) * 1e3
    return max(1, min(1000, int(target_ms / max(dt, 1e-6))))


# --------------------------------------------------------------------------- bench object


def setup_threads(threads: int | None = None) -> int:
    """Apply ``threads`` (or env ``TDFUNC_BENCH_THREADS``) to torch; return the thread count in use."""
    if threads is None and os.environ.get(THREADS_ENV):
        threads = int(os.environ[THREADS_ENV])
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Bench:
    """Collects result rows for one benchmark module.

    ``quick`` selects few rounds (smoke test); otherwise ``rounds`` / ``warmup``.
    Each ``time`` case stops early once it has used ``max_seconds_per_case``
    (the row's ``rounds`` says how many were timed).
    """

    def __init__(
        self,
        name: str,
        device: str = "cpu",
        quick: bool = False,
        *,
        rounds: int = 100,
        warmup: int = 10,
        quick_rounds: int = 5,
        quick_warmup: int = 2,
        max_seconds_per_case: float | None = 60.0,
        quick_max_seconds_per_case: float | None = 6.0,
    ):
        self.name = name
        self.device = device
        self.quick = quick
        self.rounds = quick_rounds if quick else rounds
        self.warmup = quick_warmup if quick else warmup
        self.max_seconds = quick_max_seconds_per_case if quick else max_seconds_per_case
        self.rows: list[dict[str, Any]] = []

    def check_equal(self, results: Mapping[str, Any], atol: float = 1e-6, rtol: float = 1e-5) -> float:
        return check_equal(results, atol=atol, rtol=rtol)

    def time(
        self,
        case: str,
        variants: Mapping[str, Callable[[], Any]],
        *,
        reference: str,
        also_vs: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
        notes: Mapping[str, str] | None = None,
        number: int | None = None,
        target_sample_ms: float = 2.0,
    ) -> list[dict[str, Any]]:
        """Time ``variants`` interleaved and append one row per variant.

        ``number`` (calls per sample) defaults to what makes the reference's
        sample last about ``target_sample_ms``.
        """
        if reference not in variants:
            raise KeyError(f"reference {reference!r} is not among the variants {list(variants)}")
        if number is None:
            number = 1 if self.quick else calibrate_number(variants[reference], self.device, target_sample_ms)
        timings = time_interleaved(
            variants,
            rounds=self.rounds,
            warmup=self.warmup,
            number=number,
            device=self.device,
            max_seconds=self.max_seconds,
            min_rounds=min(5, self.rounds),
        )
        vs = [reference, *[v for v in also_vs if v != reference]]
        rows = []
        for name, t in timings.items():
            rows.append(
                {
                    "bench": self.name,
                    "case": case,
                    "variant": name,
                    "median_ms": t.median_ms,
                    "q1_ms": t.q1_ms,
                    "q3_ms": t.q3_ms,
                    "iqr_ms": t.iqr_ms,
                    "min_ms": min(t.samples_ms),
                    "delta_ms": t.median_ms - timings[reference].median_ms,
                    "rounds": len(t.samples_ms),
                    "number": number,
                    "reference": reference,
                    "ratios": {v: t.median_ms / timings[v].median_ms for v in vs},
                    "params": dict(params or {}),
                    "note": (notes or {}).get(name, ""),
                    "device": self.device,
                    "quick": self.quick,
                }
            )
        self.rows.extend(rows)
        return rows


# --------------------------------------------------------------------------- output


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tensordict": _version("tensordict"),
        "tdfunc": _version("tdfunc"),
        "tdhook": _version("tdhook"),
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["processor"]
    return info


def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def render_markdown(bench_name: str, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """One markdown section per bench: a table per case, variants in insertion order."""
    lines = [f"## {bench_name}", ""]
    lines.append(
        f"{meta.get('date')} · {meta.get('device_name')} · {meta.get('cpu_count')} CPUs "
        f"({meta.get('torch_threads')} torch threads) · torch {meta.get('torch')} · "
        f"tensordict {meta.get('tensordict')}"
        + (" · **quick run (few rounds, not for quoting)**" if meta.get("quick") else "")
    )
    lines.append("")
    cases: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        cases.setdefault(row["case"], []).append(row)
    for case, crow in cases.items():
        vs = list(crow[0]["ratios"])
        rounds, number = crow[0]["rounds"], crow[0]["number"]
        lines.append(f"### {case}  ({rounds} rounds × {number} calls, interleaved)")
        lines.append("")
        spread = max(r["iqr_ms"] / r["median_ms"] for r in crow if r["median_ms"] > 0)
        if spread > NOISY_IQR:
            lines.append(
                f"> **Noisy:** an IQR reaches {spread:.0%} of its median (machine busy?); "
                "ratios below a few % are not meaningful. Re-run, or try `--threads 1`."
            )
            lines.append("")
        header = ["variant", "median ms", "IQR ms", f"Δ µs vs {vs[0]}"] + [f"× {v}" for v in vs]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in crow:
            name = f"`{row['variant']}`"
            if row["variant"] == row["reference"]:
                name += " (ref)"
            cells = [
                name,
                _fmt_ms(row["median_ms"]),
                f"{_fmt_ms(row['q1_ms'])}–{_fmt_ms(row['q3_ms'])}",
                f"{row['delta_ms'] * 1e3:+.0f}",
                *[f"{row['ratios'][v]:.2f}" for v in vs],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [(r["variant"], r["note"]) for r in crow if r.get("note")]
        if notes:
            lines.append("")
            for v, n in notes:
                lines.append(f"- `{v}`: {n}")
        lines.append("")
    return "\n".join(lines)


def write_results(
    bench_name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    device: str = "cpu",
    quick: bool = False,
    out_dir: str | Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<bench_name>.json`` and ``.md``.

    The JSON keeps one entry per device (``runs[device]``): a new run replaces
    the previous run on the same device and leaves other devices' runs alone.
    The markdown shows the run just made.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device) | {"quick": quick}
    json_path = out / f"{bench_name}.json"
    data: dict[str, Any] = {"bench": bench_name, "runs": {}}
    if json_path.exists():
        try:
            old = json.loads(json_path.read_text())
            if isinstance(old.get("runs"), dict):
                data["runs"] = old["runs"]
        except (ValueError, OSError):
            pass
    data["runs"][device] = {"meta": meta, "rows": list(rows)}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(json_path)
    md_path = out / f"{bench_name}.md"
    md_path.write_text(render_markdown(bench_name, rows, meta) + "\n")
    return json_path, md_path
