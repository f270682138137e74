"""Peak memory of integrated gradients, with and without ``chunk_size``.

Task as in ``bench_ig``: every class's IG map of ``SmallCNN`` (8/16/32 channels, 10 classes,
input 3x32x32), batch 16, Gauss–Legendre, zero baseline. What is measured is the **peak
resident-set-size increase** of one call, in MB:

- A worker process (``python -m bench.bench_ig_memory --worker``) imports everything, builds the
  model and the inputs and runs every variant once at a tiny size (so lazily loaded code and
  one-time allocations are not counted). Then, for each variant and repeat, it ``fork``s: the
  child resets its peak-RSS counter (``/proc/self/clear_refs``), reads ``VmRSS``, runs the call,
  and reports ``VmHWM - VmRSS_before`` (and a checksum of the maps). A fresh child per
  measurement, so allocator caches of earlier variants never hide or inflate a peak.
- On CUDA the same calls run in-process and ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the call is reported.

Variants, all at ``n_steps=50`` unless named: the floor / tdfunc / ``strategy='fold'`` /
``chunk_size=10`` / captum (10 calls) / tdhook (10 calls), in grad mode (the model's parameters
require grad, as any ``nn.Module``'s do); the floor and tdfunc under ``torch.no_grad()``; and
tdfunc at ``n_steps=500`` with ``chunk_size=25`` (grad mode and no_grad) and unchunked (no_grad).

Why both modes: torch.func's vjp keeps the result differentiable (double backward), so in grad
mode with parameters that require grad, the outer autograd graph holds every chunk's saved
activations until the result is freed — ``chunk_size`` then does not bound the peak. Under
``torch.no_grad()`` (torch.func still computes its own gradients) it does: the bounded variant,
``n_steps=500, chunk_size=25`` under no_grad, must need no more than the unchunked 50-step call
(asserted). Maps of chunked / unchunked / no_grad / peer calls are checked equal (checksums).

``--quick``: batch 1 and ``n_steps=200`` for the long path.

The markdown table reuses the timing layout: **read "ms" as MB and "µs" as kB** there.

Run: ``python -m bench.run --only ig_memory``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.harness import _quantile

NAME = "ig_memory"
FULL = {"batch": 16, "repeats": 1, "long_steps": 500, "long_chunk": 25}
QUICK = {"batch": 1, "repeats": 1, "long_steps": 200, "long_chunk": 25}
REFERENCE = "floor (torch.func)"
UNBOUNDED_50 = "tdfunc under no_grad"


def variants(long_steps: int, long_chunk: int) -> list[tuple[str, str, int, dict, bool]]:
    """(name, kind, n_steps, tdfunc kwargs, under torch.no_grad())."""
    n, c = long_steps, long_chunk
    return [
        ("floor (torch.func)", "floor", 50, {}, False),
        ("tdfunc", "tdfunc", 50, {}, False),
        ("tdfunc strategy='fold'", "tdfunc", 50, {"strategy": "fold"}, False),
        ("tdfunc chunk_size=10", "tdfunc", 50, {"chunk_size": 10}, False),
        ("captum (10 calls)", "captum", 50, {}, False),
        ("tdhook (10 calls)", "tdhook", 50, {}, False),
        ("floor under no_grad", "floor", 50, {}, True),
        ("tdfunc under no_grad", "tdfunc", 50, {}, True),
        ("tdfunc chunk_size=10 under no_grad", "tdfunc", 50, {"chunk_size": 10}, True),
        (f"tdfunc n_steps={n} chunk_size={c}", "tdfunc", n, {"chunk_size": c}, False),
        (f"tdfunc n_steps={n} under no_grad", "tdfunc", n, {}, True),
        (f"tdfunc n_steps={n} chunk_size={c} under no_grad", "tdfunc", n, {"chunk_size": c}, True),
    ]


def checks(long_steps: int, long_chunk: int) -> tuple[str, list[tuple[str, str]]]:
    """(the variant that must stay bounded, pairs of variants that must give the same maps)."""
    n, c = long_steps, long_chunk
    bounded = f"tdfunc n_steps={n} chunk_size={c} under no_grad"
    same = [
        (f"tdfunc n_steps={n} under no_grad", bounded),
        (f"tdfunc n_steps={n} under no_grad", f"tdfunc n_steps={n} chunk_size={c}"),
    ]
    same += [(REFERENCE, name) for name, _, steps, _, _ in variants(n, c) if steps == 50 and name != REFERENCE]
    return bounded, same


# --------------------------------------------------------------------------- worker side


def _make_call(kind: str, cnn, x: torch.Tensor, n_steps: int, kw: dict, under_no_grad: bool = False):
    from bench.bench_ig import no_grad

    call = _make_call_grad(kind, cnn, x, n_steps, kw)
    return no_grad(call) if under_no_grad else call


def _make_call_grad(kind: str, cnn, x: torch.Tensor, n_steps: int, kw: dict):
    from tensordict import TensorDict

    from bench.bench_ig import METHOD, N_CLASSES, captum_ig, floor_ig, tdhook_ig

    classes = list(range(N_CLASSES))
    if kind == "floor":
        return lambda: floor_ig(cnn, x, classes, n_steps).detach()
    if kind == "captum":
        return captum_ig(cnn, x, classes, n_steps)
    if kind == "tdhook":
        return tdhook_ig(cnn, x, classes, n_steps)
    import tdfunc

    td = TensorDict(x=x, batch_size=[x.shape[0]])
    return lambda: tdfunc.integrated_gradients(lambda t: cnn(t["x"]), td, n_steps=n_steps, method=METHOD, **kw)[
        "attr", "x"
    ].detach()


def _proc_status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024  # kB -> MB
    return out


def _measure_forked(call) -> dict:
    """Run ``call`` in a forked child; return its peak RSS increase (MB), wall time and checksums."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            before = _proc_status()
            base = before["VmRSS"]
            t0 = time.perf_counter()
            out = call()
            wall = time.perf_counter() - t0
            after = _proc_status()
            msg = {
                "peak_mb": after["VmHWM"] - base,
                "hwm_before_mb": before["VmHWM"] - base,  # > 0 if the reset failed
                "wall_s": wall,
                "sum": float(out.double().sum()),
                "abs": float(out.double().abs().sum()),
            }
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            msg, code = {"error": f"{type(e).__name__}: {e}"}, 1
        os.write(w, json.dumps(msg).encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks).decode() or '{"error": "no result from child"}')


def _measure_cuda(call) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before
    return {
        "peak_mb": peak / 2**20,
        "wall_s": wall,
        "sum": float(out.double().sum()),
        "abs": float(out.double().abs().sum()),
    }


MB_PER_IMAGE_STEP_GRAD = 0.8  # measured: grad-mode peak ~0.75 MB per (image x path step), chunked or not


def _mem_available_mb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def worker(cfg: dict) -> list[dict]:
    from bench._models import images, small_cnn

    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    cnn = small_cnn(seed=0).to(device)
    x = images(cfg["batch"]).to(device)
    x_tiny = images(1).to(device)
    todo = variants(cfg["long_steps"], cfg["long_chunk"])
    for _, kind, _, kw, ng in todo:  # warm every code path at a tiny size
        _make_call(kind, cnn, x_tiny, 2, {k: (1 if k == "chunk_size" else v) for k, v in kw.items()}, ng)()
    import gc

    gc.collect()
    results = []
    for name, kind, n_steps, kw, ng in todo:
        need = MB_PER_IMAGE_STEP_GRAD * cfg["batch"] * n_steps
        if not ng and n_steps > 50 and need > 0.6 * _mem_available_mb():
            print(f"ig_memory: skipping {name!r}: needs ~{need:.0f} MB", file=sys.stderr)
            continue  # the grad-mode long path is unbounded (~6 GB at batch 16); skip on small machines
        call = _make_call(kind, cnn, x, n_steps, kw, ng)
        repeats = 1 if n_steps > 50 else cfg["repeats"]
        for _ in range(repeats):
            gc.collect()
            m = _measure_cuda(call) if device.startswith("cuda") else _measure_forked(call)
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            results.append({"variant": name, "n_steps": n_steps, **m})
        del call
    return results


# --------------------------------------------------------------------------- parent side


def _rows(results: list[dict], cfg: dict, device: str, quick: bool) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    med = {v: statistics.median(m["peak_mb"] for m in ms) for v, ms in by.items()}
    bounded, same_maps = checks(cfg["long_steps"], cfg["long_chunk"])
    # correctness: same maps (checksums) where the math is the same
    for a, bname in same_maps:
        if a not in by or bname not in by:
            continue  # skipped for lack of memory
        ra, rb = by[a][0], by[bname][0]
        for key in ("sum", "abs"):
            tol = 1e-4 * abs(ra["abs"]) + 1e-6
            if abs(ra[key] - rb[key]) > tol:
                raise AssertionError(f"{bname!r} vs {a!r}: checksum {key} {rb[key]!r} != {ra[key]!r}")
    # bounded memory: n_steps=500 in chunks of 25 needs no more than one unchunked 50-step call
    if med[bounded] > 1.1 * med[UNBOUNDED_50] + 5:
        raise AssertionError(
            f"{bounded!r} peaked at {med[bounded]:.1f} MB, more than {UNBOUNDED_50!r} ({med[UNBOUNDED_50]:.1f} MB)"
        )
    case = (
        f"SmallCNN B={cfg['batch']}, 10 classes: peak memory increase of one call, "
        f"{'CUDA max_memory_allocated' if device.startswith('cuda') else 'RSS'} (read ms as MB, µs as kB)"
    )
    rows = []
    for name, ms in by.items():
        peaks = [m["peak_mb"] for m in ms]
        walls = [m["wall_s"] for m in ms]
        rows.append(
            {
                "bench": NAME,
                "case": case,
                "variant": name,
                "unit": "MB",
                "median_ms": med[name],
                "q1_ms": _quantile(peaks, 0.25),
                "q3_ms": _quantile(peaks, 0.75),
                "iqr_ms": _quantile(peaks, 0.75) - _quantile(peaks, 0.25),
                "min_ms": min(peaks),
                "delta_ms": med[name] - med[REFERENCE],
                "rounds": len(peaks),
                "number": 1,
                "reference": REFERENCE,
                "ratios": {v: med[name] / med[v] for v in (REFERENCE, UNBOUNDED_50)},
                "params": {
                    "batch": cfg["batch"],
                    "n_steps": ms[0]["n_steps"],
                    "classes": 10,
                    "threads": cfg["threads"],
                },
                "note": f"n_steps={ms[0]['n_steps']}; wall {statistics.median(walls):.2f} s (one call, in the measuring child)",
                "device": device,
                "quick": quick,
                "peak_mb_samples": peaks,
                "wall_s_samples": walls,
            }
        )
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    cfg = {**(QUICK if quick else FULL), "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        results = worker(cfg)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.bench_ig_memory", "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    return _rows(results, cfg, device, quick)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        raise SystemExit(0)
    from bench.run import main

    raise SystemExit(main(["--only", NAME]))
