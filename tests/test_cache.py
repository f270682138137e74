"""tdfunc.latent.cache_activations: in memory = direct captures, reductions, globs, GPT-2 and TensorDictModule,
the on-disk cache, resumability after a real kill (also between the data write and the progress
record), and every error message pinned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tensordict import MemoryMappedTensor, TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

import tdfunc
from tdfunc.latent import CacheError

# The model and data, built identically here and in the subprocesses that get killed.
SETUP = textwrap.dedent("""
    import torch
    from tensordict import TensorDict
    torch.set_num_threads(1)
    torch.manual_seed(0)
    NET = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    DATA = [TensorDict({"input": torch.randn(5, 6, 4, generator=g)}, batch_size=[5]) for _ in range(6)]

    class NoLen:  # re-iterable and deterministic, but without len(): the files grow per batch
        def __init__(self, data): self.data = data
        def __iter__(self): return iter(self.data)
""")
ns: dict = {}
exec(SETUP, ns)
NET, DATA, NoLen = ns["NET"], ns["DATA"], ns["NoLen"]
SITES = ["*"]


def _direct(net, data, sites, reduce=lambda v: v):
    caps = [tdfunc.functional_call(net, None, (b["input"],), capture=sites)[1] for b in data]
    return {k: torch.cat([reduce(c[k]) for c in caps]) for k in caps[0].keys()}


def _assert_same(cache, ref):
    assert sorted(cache.keys()) == sorted(ref.keys())
    for k, v in ref.items():
        assert torch.equal(torch.as_tensor(cache[k]), v), k


# ------------------------------------------------------------------------------------------- in memory


def test_in_memory_equals_direct_captures_and_glob_expands():
    cache = tdfunc.latent.cache_activations(NET, tdfunc.state(NET), DATA, SITES, progress=False)
    assert sorted(cache.keys()) == ["0", "1", "2"] and cache.batch_size == torch.Size([30])
    assert cache["1"].shape == (30, 6, 8)
    _assert_same(cache, _direct(NET, DATA, SITES))


@pytest.mark.parametrize("reduce,fn", [("last", lambda v: v[:, -1]), ("mean", lambda v: v.mean(1)),
                                       (lambda v: v.amax(1), lambda v: v.amax(1))])
def test_reduce_named_and_callable(reduce, fn):
    cache = tdfunc.latent.cache_activations(NET, None, DATA, ["0", "2"], reduce=reduce, progress=False)
    assert cache["0"].shape == (30, 8) and cache["2"].shape == (30, 3)
    _assert_same(cache, _direct(NET, DATA, ["0", "2"], fn))


def test_inputs_callable_and_progress_bar_on_stderr(capsys):
    pytest.importorskip("tqdm")
    calls = []

    def inputs(batch):
        calls.append(1)
        return (batch["input"] * 2,), {}

    cache = tdfunc.latent.cache_activations(NET, None, DATA[:2], "1", inputs=inputs)
    assert len(calls) == 2
    _assert_same(cache, _direct(NET, [TensorDict({"input": b["input"] * 2}, [5]) for b in DATA[:2]], ["1"]))
    err = capsys.readouterr()
    assert "tdfunc.latent.cache_activations" in err.err and "2/2" in err.err and err.out == ""


def test_gpt2_every_block_output():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    toks = torch.randint(0, 64, (6, 7))
    data = [TensorDict({"input_ids": toks[i:i + 2]}, batch_size=[2]) for i in range(0, 6, 2)]
    cache = tdfunc.latent.cache_activations(gpt2, tdfunc.state(gpt2), data, "transformer.h.*", input_key="input_ids",
                                     reduce="last", progress=False)
    assert sorted(cache.keys()) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    hidden = gpt2(toks, output_hidden_states=True).hidden_states
    for i in range(2):  # the last block's output is hidden_states[3] before ln_f
        torch.testing.assert_close(cache[f"transformer.h.{i}"], hidden[i + 1][:, -1], rtol=0, atol=0)
    assert cache["transformer.h.2"].shape == (6, 32)


def test_tensordict_module_batch_passed_whole():
    tdm = TensorDictModule(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), in_keys=["x"], out_keys=["h"])
    data = [TensorDict({"x": torch.randn(3, 4)}, batch_size=[3]) for _ in range(2)]
    cache = tdfunc.latent.cache_activations(tdm, tdfunc.state(tdm), data, "module.1", input_key=None, progress=False)
    ref = torch.cat([tdm.module(b["x"]) for b in data])
    assert torch.equal(cache["module.1"], ref)
    assert all("h" not in b.keys() for b in data)


# --------------------------------------------------------------------------------------------- on disk


@pytest.mark.parametrize("wrap", [list, NoLen], ids=["preallocated", "grown"])
def test_disk_equals_memory_and_complete_cache_is_loaded(tmp_path, wrap):
    path = str(tmp_path / "c")
    ref = tdfunc.latent.cache_activations(NET, None, DATA, SITES, reduce="mean", progress=False)
    cache = tdfunc.latent.cache_activations(NET, None, wrap(DATA), SITES, path=path, reduce="mean", progress=False)
    assert all(isinstance(cache[k], MemoryMappedTensor) for k in cache.keys())
    _assert_same(cache, dict(ref.items()))
    rec = json.load(open(os.path.join(path, "cache.json")))
    assert rec["complete"] and rec["batches_done"] == 6 and rec["rows_done"] == 30
    assert sorted(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".memmap")) == [
        30 * 3 * 4, 30 * 8 * 4, 30 * 8 * 4]  # no preallocated rows left past the end
    calls = []
    again = tdfunc.latent.cache_activations(NET, None, wrap(DATA), SITES, path=path, reduce="mean", progress=False,
                                     inputs=lambda b: calls.append(1) or ((b["input"],), {}))
    assert calls == [] and all(torch.equal(again[k], ref[k]) for k in ref.keys())


def test_disk_uneven_last_batch_and_total_hint(tmp_path):
    data = DATA[:3] + [DATA[3][:2]]
    ref = tdfunc.latent.cache_activations(NET, None, data, "1", progress=False)
    for name, total in (("a", None), ("b", 17), ("c", 40)):
        cache = tdfunc.latent.cache_activations(NET, None, data, "1", path=str(tmp_path / name), total=total, progress=False)
        assert cache.batch_size == torch.Size([17]) and torch.equal(cache["1"], ref["1"])


KILLED = textwrap.dedent("""
    import os, signal, sys, tdfunc
    import tdfunc.latent._cache as C
    ROOT = sys.argv[1]

    def batches():  # SIGKILL while fetching batch 3: batches 0-2 are done
        for i, b in enumerate(DATA):
            if i == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b

    class Killing(NoLen):  # re-iterable, without len() (files grown per batch)
        def __iter__(self): return batches()

    class KillingLen(Killing):  # with len() (files preallocated)
        def __len__(self): return len(self.data)

    def between(path):  # batch 2's rows reach the disk, its progress record does not
        write = C._write_progress
        def killing(path, record):
            if record["batches_done"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, record)
        C._write_progress = killing
        tdfunc.latent.cache_activations(NET, None, DATA, ["*"], path=path, progress=False)

    runs = {"list": lambda p: tdfunc.latent.cache_activations(NET, None, KillingLen(DATA), ["*"], path=p, progress=False),
            "NoLen": lambda p: tdfunc.latent.cache_activations(NET, None, Killing(DATA), ["*"], path=p, progress=False),
            "between": between}
    for name, run in runs.items():  # one interpreter, one forked child per scenario, each really killed
        pid = os.fork()
        if pid == 0:
            try:
                run(os.path.join(ROOT, name))
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        print(name, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
""")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("killed"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", SETUP + KILLED, root], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["list", "9", "NoLen", "9", "between", "9"], proc.stdout  # SIGKILL = 9
    return root


def _resume_and_check(path: str, already: int, wrap=list):
    calls = []
    cache = tdfunc.latent.cache_activations(NET, None, wrap(DATA), SITES, path=path, progress=False,
                                     inputs=lambda b: calls.append(1) or ((b["input"],), {}))
    assert len(calls) == len(DATA) - already  # done batches are skipped, not recomputed
    ref = tdfunc.latent.cache_activations(NET, None, DATA, SITES, progress=False)
    assert cache.batch_size == ref.batch_size == torch.Size([30])  # nothing duplicated or lost
    _assert_same(cache, dict(ref.items()))


@pytest.mark.parametrize("wrap", ["list", "NoLen"])
def test_resume_after_kill_mid_run(killed, wrap):
    path = os.path.join(killed, wrap)
    rec = json.load(open(os.path.join(path, "cache.json")))
    assert rec["batches_done"] == 3 and rec["rows_done"] == 15 and not rec["complete"]
    _resume_and_check(path, 3, list if wrap == "list" else NoLen)


def test_resume_after_kill_between_data_write_and_progress_record(killed):
    path = os.path.join(killed, "between")
    rec = json.load(open(os.path.join(path, "cache.json")))
    assert rec["batches_done"] == 2 and rec["rows_done"] == 10 and not rec["complete"]
    j = list(rec["spec"]).index("2")
    on_disk = MemoryMappedTensor.from_filename(os.path.join(path, f"{j}.memmap"), torch.float32, (30, 6, 3))
    ref = _direct(NET, DATA, ["2"])["2"]
    assert torch.equal(on_disk[10:15], ref[10:15])  # the unrecorded batch was written ...
    _resume_and_check(path, 2)  # ... and is rewritten in place, not appended again


# ---------------------------------------------------------------------------------------------- errors


def _raises(msg, *args, **kwargs):
    kwargs.setdefault("progress", False)
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(*args, **kwargs)
    assert str(e.value) == msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, tdfunc.TdfuncError)


def test_errors_cache():
    fn = "tdfunc.latent.cache_activations"
    _raises(f"{fn}: unknown reduce 'max'; use None, 'last' (last position along dim 1), 'mean' (mean over dim 1) "
            "or a callable value -> value.", NET, None, DATA, "1", reduce="max")
    _raises(f"{fn}: batches yielded no batch; pass a non-empty, re-iterable iterable of TensorDict batches (a list, "
            "or a DataLoader).", NET, None, [], "1")
    _raises(f"{fn}: batch 0 has no key 'input' (keys: ['x', 'y']); set input_key to the key holding the model "
            "input, or pass inputs=lambda batch: ((...,), {}).",
            NET, None, [TensorDict({"x": torch.ones(2, 4), "y": torch.ones(2)}, [2])], "1")
    _raises(f"{fn}: batch 0 is a Tensor, not a TensorDict; yield TensorDict batches (e.g. "
            "TensorDict({'input': x}, batch_size=[len(x)])).", NET, None, [torch.ones(2, 4)], "1")
    _raises(f"{fn}: total must be None or an integer >= 1, got 0.", NET, None, DATA, "1", total=0)


def test_errors_cache_incompatible_path(tmp_path):
    fn = "tdfunc.latent.cache_activations"
    path = str(tmp_path / "c")
    tdfunc.latent.cache_activations(NET, None, DATA[:2], ["0", "2"], path=path, progress=False)
    _raises(f"{fn}: the cache at {path!r} was written for sites ['0', '2'] with reduce=None but this call has "
            "sites ['1'] with reduce=None; pass the same sites and reduce to resume it, or another path for a new "
            "cache.", NET, None, DATA[:2], ["1"], path=path)
    os.remove(os.path.join(path, "cache.json"))
    _raises(f"{fn}: path {path!r} exists and is not a tdfunc activation cache (no cache.json); pass a new path or "
            "an empty directory.", NET, None, DATA[:2], ["1"], path=path)
    path2 = str(tmp_path / "d")
    tdfunc.latent.cache_activations(NET, None, NoLen(DATA[:2]), ["0"], path=path2, progress=False)
    rec = json.load(open(os.path.join(path2, "cache.json")))
    json.dump({**rec, "complete": False}, open(os.path.join(path2, "cache.json"), "w"))
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 16))
    _raises(f"{fn}: the cache at {path2!r} holds rows {{'0': ((6, 8), 'float32')}} (shape after the batch dim, "
            "dtype) but batch 2 gives {'0': ((6, 16), 'float32')}; pass the same model, sites and reduce to resume "
            "it, or another path for a new cache.", wider, None, DATA[:3], ["0"], path=path2)
    _raises(f"{fn}: batches yielded 1 batches but the cache at {path2!r} already holds 2; batches must be the same "
            "deterministic iterable as in the interrupted run.", NET, None, DATA[:1], ["0"], path=path2)
