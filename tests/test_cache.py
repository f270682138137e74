"""tdfunc.latent.cache_activations: in memory = direct captures, reductions, globs, GPT-2 and TensorDictModule,
the on-disk cache, resumability after a real kill (also between the data write and the progress
record), and every error message pinned."""

from __future__ import annotations

import errno
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


@pytest.mark.parametrize(
    "reduce,fn",
    [("last", lambda v: v[:, -1]), ("mean", lambda v: v.mean(1)), (lambda v: v.amax(1), lambda v: v.amax(1))],
)
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
    cfg = transformers.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    toks = torch.randint(0, 64, (6, 7))
    data = [TensorDict({"input_ids": toks[i : i + 2]}, batch_size=[2]) for i in range(0, 6, 2)]
    cache = tdfunc.latent.cache_activations(
        gpt2, tdfunc.state(gpt2), data, "transformer.h.*", input_key="input_ids", reduce="last", progress=False
    )
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
        30 * 3 * 4,
        30 * 8 * 4,
        30 * 8 * 4,
    ]  # no preallocated rows left past the end
    calls = []
    again = tdfunc.latent.cache_activations(
        NET,
        None,
        wrap(DATA),
        SITES,
        path=path,
        reduce="mean",
        progress=False,
        inputs=lambda b: calls.append(1) or ((b["input"],), {}),
    )
    assert calls == [] and all(torch.equal(again[k], ref[k]) for k in ref.keys())


def test_disk_uneven_last_batch_and_total_hint(tmp_path):
    data = DATA[:3] + [DATA[3][:2]]
    ref = tdfunc.latent.cache_activations(NET, None, data, "1", progress=False)
    for name, total in (("a", None), ("b", 17), ("c", 40)):
        cache = tdfunc.latent.cache_activations(
            NET, None, data, "1", path=str(tmp_path / name), total=total, progress=False
        )
        assert cache.batch_size == torch.Size([17]) and torch.equal(cache["1"], ref["1"])


KILLED = textwrap.dedent("""
    import os, random, signal, sys, threading, time, tdfunc
    import tdfunc.latent._cache_io as IO
    from tdfunc.latent import CacheError
    from tdfunc.latent._cache_id import fingerprint
    ROOT = sys.argv[1]
    print("fingerprint", fingerprint(REDUCE))  # compared with the test process's (another hash seed)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_at(owner, name, n=1, when=lambda *a, **k: True, after=False):
        \"\"\"SIGKILL this process at the n-th call of owner.name for which when(*args) holds (before it runs, or after).\"\"\"
        orig, count = getattr(owner, name), [0]
        def wrapped(*args, **kwargs):
            hit = when(*args, **kwargs) and (count.__setitem__(0, count[0] + 1) or count[0] == n)
            if hit and not after:
                kill()
            out = orig(*args, **kwargs)
            if hit:
                kill()
            return out
        setattr(owner, name, wrapped)

    def batches():  # SIGKILL while fetching batch 3: batches 0-2 are done
        for i, b in enumerate(DATA):
            if i == 3:
                kill()
            yield b

    class Killing(NoLen):  # re-iterable, without len() (files grown per batch)
        def __iter__(self): return batches()

    class KillingLen(Killing):  # with len() (files preallocated)
        def __len__(self): return len(self.data)

    def run(path, data=DATA):
        tdfunc.latent.cache_activations(NET, None, data, ["*"], path=path, progress=False)

    def injected(inject):
        def scenario(path):
            inject()
            run(path)
        return scenario

    runs = {
        "list": lambda p: run(p, KillingLen(DATA)),
        "NoLen": lambda p: run(p, Killing(DATA)),
        # batch 2's rows reach the disk, its progress record does not
        "between": injected(lambda: kill_at(IO, "write_progress", when=lambda p, r: r["batches_done"] == 3)),
        # the first write: files, lock and record are built in a hidden sibling, renamed into place
        "first-files": injected(lambda: kill_at(IO, "preallocate", n=2)),
        "first-record": injected(lambda: kill_at(IO, "write_json")),
        "first-rename": injected(lambda: kill_at(IO, "publish")),
        "first-renamed": injected(lambda: kill_at(IO, "publish", after=True)),
        # batch 2: the first of its three files written, the others not
        "rows": injected(lambda: kill_at(IO, "write_rows", n=7, after=True)),
        # every batch recorded; one file truncated to its rows, the others still preallocated
        "truncate": injected(lambda: kill_at(os, "truncate", after=True)),
        "finish": injected(lambda: kill_at(IO, "write_progress", when=lambda p, r: r["complete"])),
    }
    for name, scenario in runs.items():  # one interpreter, one forked child per scenario, each really killed
        pid = os.fork()
        if pid == 0:
            try:
                scenario(os.path.join(ROOT, name))
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        print(name, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))

    def child(path, delay=None):  # a forked child running the cache, SIGKILLed after `delay` seconds
        pid = os.fork()
        if pid == 0:
            if delay is not None:
                threading.Timer(delay, kill).start()
            try:
                run(path)
                os._exit(0)
            except CacheError as e:
                print("broken", e)
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)

    # random kills: children killed after a random time within one run's duration, until one completes;
    # none may find a cache it cannot resume
    t0 = time.perf_counter()
    child(os.path.join(ROOT, "timing"))
    duration = time.perf_counter() - t0
    rng, kills = random.Random(0), 0
    for r in range(4):
        for attempt in range(60):
            got = child(os.path.join(ROOT, f"random{r}"), rng.uniform(0, duration / 2) + attempt * duration / 10)
            if got != 9:
                break
            kills += 1
        if got != 0:
            print("random-exit", got)
    print("random", kills, "duration", round(duration, 3))
""")


def _reduce(v):  # REDUCE in the killed process: fingerprints agree across processes
    return v.amax(1) * 2.5


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("killed"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    setup = SETUP + "def REDUCE(v):\n    return v.amax(1) * 2.5\n"
    proc = subprocess.run(
        [sys.executable, "-c", setup + KILLED, root], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out.pop("fingerprint") == tdfunc.latent._cache_id.fingerprint(_reduce)
    assert int(out.pop("random").split()[0]) >= 1, proc.stdout
    assert out == {
        name: "9"
        for name in (
            "list",
            "NoLen",
            "between",
            "first-files",
            "first-record",
            "first-rename",
            "first-renamed",
            "rows",
            "truncate",
            "finish",
        )
    }, proc.stdout  # SIGKILL
    return root


def _resume_and_check(path: str, already: int, wrap=list):
    calls = []
    cache = tdfunc.latent.cache_activations(
        NET, None, wrap(DATA), SITES, path=path, progress=False, inputs=lambda b: calls.append(1) or ((b["input"],), {})
    )
    assert len(calls) == len(DATA) - already  # done batches are skipped, not recomputed
    ref = tdfunc.latent.cache_activations(NET, None, DATA, SITES, progress=False)
    assert cache.batch_size == ref.batch_size == torch.Size([30])  # nothing duplicated or lost
    _assert_same(cache, dict(ref.items()))
    assert sorted(os.listdir(path)) == [".lock", "0.memmap", "1.memmap", "2.memmap", "cache.json"]
    parent, name = os.path.split(path)
    assert not [e for e in os.listdir(parent) if e.startswith(f".{name}.tmp-")]  # no half-built sibling left


def _record(path):
    return json.load(open(os.path.join(path, "cache.json")))


@pytest.mark.parametrize("wrap", ["list", "NoLen"])
def test_resume_after_kill_mid_run(killed, wrap):
    path = os.path.join(killed, wrap)
    rec = _record(path)
    assert rec["batches_done"] == 3 and rec["rows_done"] == 15 and not rec["complete"]
    assert open(os.path.join(path, ".lock")).read().isdigit()  # the dead writer's lock does not block
    _resume_and_check(path, 3, list if wrap == "list" else NoLen)


def test_resume_after_kill_between_data_write_and_progress_record(killed):
    path = os.path.join(killed, "between")
    rec = _record(path)
    assert rec["batches_done"] == 2 and rec["rows_done"] == 10 and not rec["complete"]
    j = list(rec["spec"]).index("2")
    on_disk = MemoryMappedTensor.from_filename(os.path.join(path, f"{j}.memmap"), torch.float32, (30, 6, 3))
    ref = _direct(NET, DATA, ["2"])["2"]
    assert torch.equal(on_disk[10:15], ref[10:15])  # the unrecorded batch was written ...
    _resume_and_check(path, 2)  # ... and is rewritten in place, not appended again


@pytest.mark.parametrize("name", ["first-files", "first-record", "first-rename"])
def test_kill_during_the_first_write_leaves_no_cache(killed, name):
    path = os.path.join(killed, name)
    siblings = [e for e in os.listdir(killed) if e.startswith(f".{name}.tmp-")]
    assert not os.path.exists(path) and len(siblings) == 1  # nothing at path; the half-built sibling ...
    _resume_and_check(path, 0)  # ... is removed by the next call, which starts afresh


@pytest.mark.parametrize(
    "name,already,complete",
    [("first-renamed", 0, False), ("rows", 2, False), ("truncate", 6, False), ("finish", 6, False)],
)
def test_resume_after_kill_between_writes_and_truncations(killed, name, already, complete):
    path = os.path.join(killed, name)
    rec = _record(path)
    assert rec["batches_done"] == already and rec["complete"] == complete
    _resume_and_check(path, already)


@pytest.mark.parametrize("r", range(4))
def test_random_kills_lose_nothing(killed, r):
    _resume_and_check(os.path.join(killed, f"random{r}"), 6)  # the last child completed it: nothing recomputed


# ---------------------------------------------------------------------------------------------- errors


def _raises(msg, *args, **kwargs):
    kwargs.setdefault("progress", False)
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(*args, **kwargs)
    assert str(e.value) == msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, tdfunc.TdfuncError)


def test_errors_cache_reduce_without_positions_and_bad_sites():
    """Issue 15: reduce='last' on a (B, D) site kept the last hidden unit; sites=3 was a raw TypeError."""
    fn = "tdfunc.latent.cache_activations"
    flat = [TensorDict({"input": torch.randn(3, 4)}, [3])]
    for reduce in ("last", "mean"):
        _raises(
            f"{fn}: reduce={reduce!r} reduces dim 1 (positions) of a (B, T, ..., D) value, but the value at '0' "
            "has shape (3, 8), with no position dim (it would reduce the features); use reduce=None or a "
            "callable for this site.",
            NET,
            None,
            flat,
            "0",
            reduce=reduce,
        )
    assert tdfunc.latent.cache_activations(NET, None, flat, "0", progress=False)["0"].shape == (3, 8)
    for sites, shown in ((3, "int (3)"), ([], "list ([])"), (["0", 2], "list (['0', 2])")):
        with pytest.raises(CacheError) as e:
            tdfunc.latent.cache_activations(NET, None, DATA, sites, progress=False)
        assert isinstance(e.value, TypeError)
        assert str(e.value) == (
            f"{fn}: sites must be a site string or a non-empty list of site strings, got {shown}; "
            "e.g. sites='blocks.*' or sites=['blocks.0', 'blocks.1.attn']."
        )


def test_errors_cache():
    fn = "tdfunc.latent.cache_activations"
    _raises(
        f"{fn}: unknown reduce 'max'; use None, 'last' (last position along dim 1), 'mean' (mean over dim 1) "
        "or a callable value -> value.",
        NET,
        None,
        DATA,
        "1",
        reduce="max",
    )
    _raises(
        f"{fn}: batches yielded no batch; pass a non-empty, re-iterable iterable of TensorDict batches (a list, "
        "or a DataLoader).",
        NET,
        None,
        [],
        "1",
    )
    _raises(
        f"{fn}: batch 0 has no key 'input' (keys: ['x', 'y']); set input_key to the key holding the model "
        "input, or pass inputs=lambda batch: ((...,), {}).",
        NET,
        None,
        [TensorDict({"x": torch.ones(2, 4), "y": torch.ones(2)}, [2])],
        "1",
    )
    _raises(
        f"{fn}: batch 0 is a Tensor, not a TensorDict; yield TensorDict batches (e.g. "
        "TensorDict({'input': x}, batch_size=[len(x)])).",
        NET,
        None,
        [torch.ones(2, 4)],
        "1",
    )
    _raises(f"{fn}: total must be None or an integer >= 1, got 0.", NET, None, DATA, "1", total=0)


def test_errors_cache_incompatible_path(tmp_path):
    fn = "tdfunc.latent.cache_activations"
    path = str(tmp_path / "c")
    tdfunc.latent.cache_activations(NET, None, DATA[:2], ["0", "2"], path=path, progress=False)
    _raises(
        f"{fn}: the cache at {path!r} was written for sites ['0', '2'] with reduce=None but this call has "
        "sites ['1'] with reduce=None; pass the same sites and reduce to resume it, or another path for a new "
        "cache.",
        NET,
        None,
        DATA[:2],
        ["1"],
        path=path,
    )
    os.remove(os.path.join(path, "cache.json"))
    _raises(
        f"{fn}: path {path!r} exists and is not a tdfunc activation cache (no cache.json); pass a new path or "
        "an empty directory.",
        NET,
        None,
        DATA[:2],
        ["1"],
        path=path,
    )
    path2 = str(tmp_path / "d")
    tdfunc.latent.cache_activations(NET, None, NoLen(DATA[:2]), ["0"], path=path2, progress=False)
    rec = json.load(open(os.path.join(path2, "cache.json")))
    json.dump({**rec, "complete": False}, open(os.path.join(path2, "cache.json"), "w"))
    longer = TensorDict({"input": torch.randn(5, 7, 4)}, batch_size=[5])  # same run, a batch of other rows
    _raises(
        f"{fn}: the cache at {path2!r} holds rows {{'0': ((6, 8), 'float32')}} (shape after the batch dim, "
        "dtype) but batch 2 gives {'0': ((7, 8), 'float32')}; pass the same model, sites and reduce to resume "
        "it, or another path for a new cache.",
        NET,
        None,
        DATA[:2] + [longer],
        ["0"],
        path=path2,
    )
    _raises(
        f"{fn}: batches yielded 1 batches but the cache at {path2!r} already holds 2; batches must be the same "
        "deterministic iterable as in the interrupted run.",
        NET,
        None,
        DATA[:1],
        ["0"],
        path=path2,
    )


# ------------------------------------------------------------------------------------------ reductions


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
PADDED = [TensorDict({"input": DATA[0]["input"][:4], "attention_mask": MASK}, batch_size=[4])]


def test_masked_mean_and_reduce_with_the_batch():
    v = _direct(NET, PADDED, ["1"])["1"]
    ref = torch.stack([v[b, MASK[b].bool()].mean(0) if MASK[b].any() else torch.zeros(8) for b in range(4)])
    cache = tdfunc.latent.cache_activations(NET, None, PADDED, "1", reduce="masked_mean", progress=False)
    torch.testing.assert_close(cache["1"], ref)
    assert not torch.allclose(
        tdfunc.latent.cache_activations(NET, None, PADDED, "1", reduce="mean", progress=False)["1"], ref
    )  # "mean" counts padding
    renamed = [TensorDict({"input": PADDED[0]["input"], "m": MASK}, batch_size=[4])]
    again = tdfunc.latent.cache_activations(NET, None, renamed, "1", reduce="masked_mean", mask_key="m", progress=False)
    assert torch.equal(again["1"], cache["1"])

    def masked_sum(value, batch):  # two required parameters: called with the batch
        return (value * batch["attention_mask"][..., None]).sum(1)

    def amax(value, dim=1):  # one required parameter: called with the value alone
        return value.amax(dim)

    got = tdfunc.latent.cache_activations(NET, None, PADDED, "1", reduce=masked_sum, progress=False)
    torch.testing.assert_close(got["1"], (v * MASK[..., None]).sum(1))
    got = tdfunc.latent.cache_activations(NET, None, PADDED, "1", reduce=amax, progress=False)
    assert torch.equal(got["1"], v.amax(1))


def test_errors_masked_mean():
    fn = "tdfunc.latent.cache_activations"
    _raises(
        f"{fn}: reduce='masked_mean' reads the mask 'attention_mask' of each batch but batch 0 has no such key "
        "(keys: ['input']); set mask_key to the batch's attention mask, or use reduce='mean' (which averages over "
        "padding too).",
        NET,
        None,
        DATA,
        "1",
        reduce="masked_mean",
    )
    bad = [TensorDict({"input": DATA[0]["input"][:4], "attention_mask": MASK[:, :5]}, batch_size=[4])]
    _raises(
        f"{fn}: the mask 'attention_mask' of batch 0 has shape (4, 5) but the value at '1' has shape (4, 6, 8); the "
        "mask must be (batch, positions) = (4, 6), 1 for real tokens and 0 for padding.",
        NET,
        None,
        bad,
        "1",
        reduce="masked_mean",
    )
    with pytest.raises(TypeError) as e:
        tdfunc.latent.cache_activations(NET, None, PADDED, "1", reduce="masked_mean", mask_key=3, progress=False)
    assert isinstance(e.value, CacheError)
    assert str(e.value) == f"{fn}: mask_key must be a batch key (a string or a tuple of strings), got int (3)."


# ------------------------------------------------------------------------------------- what is verified

FN = "tdfunc.latent.cache_activations"


def _other_run(path, diffs):
    return (
        f"{FN}: the cache at {path!r} was written by another run: {diffs}. To resume or load it pass the same "
        "state, batches and reduce; otherwise delete the directory or pass a new path to start a new cache."
    )


class Interrupted(NoLen):  # has a length; raises while fetching batch 3, as a kill would (3 batches recorded)
    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for i, b in enumerate(self.data):
            if i == 3:
                raise KeyboardInterrupt
            yield b


def _interrupted(path, net=NET, reduce=None, data=DATA, **kw):
    with pytest.raises(KeyboardInterrupt):
        tdfunc.latent.cache_activations(
            net, None, Interrupted(data), SITES, path=path, reduce=reduce, progress=False, **kw
        )
    assert _record(path)["batches_done"] == 3


torch.manual_seed(5)
NET2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
DATA2 = [TensorDict({"input": b["input"] * 2}, batch_size=[5]) for b in DATA]


def test_resume_and_load_verify_state_data_length_and_reduce(tmp_path):
    from tdfunc.latent._cache_id import state_digest

    there, here = state_digest(NET, None)[:12], state_digest(NET2, None)[:12]
    state = f"the model state differs (digest {there} there, {here} here: other weights or buffers)"
    data = "the first batch differs (other data, or another order)"
    path = str(tmp_path / "a")
    _interrupted(path)
    _raises(_other_run(path, state), NET2, None, DATA, SITES, path=path)
    _raises(_other_run(path, data), NET, None, DATA2, SITES, path=path)
    _raises(
        _other_run(path, f"{state}; the batches number 5 here but 6 there"), NET2, None, DATA2[:5], SITES, path=path
    )  # (the first batch is compared when the resumed run reaches it)
    cache = tdfunc.latent.cache_activations(NET, tdfunc.state(NET), DATA, SITES, path=path, progress=False)
    _assert_same(cache, _direct(NET, DATA, SITES))  # the same tensors given as a state: the same run
    _raises(_other_run(path, "the batches number 4 here but 6 there"), NET, None, DATA[:4], SITES, path=path)
    _raises(_other_run(path, state), NET2, None, DATA, SITES, path=path)  # complete caches are verified too
    _raises(_other_run(path, data), NET, None, DATA2, SITES, path=path)
    _raises(
        _other_run(path, f"{state}; {data}; the batches number 5 here but 6 there"),
        NET2,
        None,
        DATA2[:5],
        SITES,
        path=path,
    )


def test_resume_verifies_the_reduce_callable_and_mask_key(tmp_path):
    def amin(v):
        return v.amin(1)

    path = str(tmp_path / "a")
    _interrupted(path, reduce=lambda v: v.amax(1))
    _raises(
        _other_run(
            path,
            "the reduce callable differs (another function, or its code, constants, defaults, "
            "closure or globals changed)",
        ),
        NET,
        None,
        DATA,
        SITES,
        path=path,
        reduce=amin,
    )
    cache = tdfunc.latent.cache_activations(
        NET, None, DATA, SITES, path=path, reduce=lambda v: v.amax(1), progress=False
    )  # the same code written again: the same run
    _assert_same(cache, _direct(NET, DATA, SITES, lambda v: v.amax(1)))
    path = str(tmp_path / "b")
    padded = [TensorDict({**b, "attention_mask": torch.ones(5, 6), "m": torch.ones(5, 6)}, [5]) for b in DATA]
    _interrupted(path, reduce="masked_mean", data=padded)
    _raises(
        _other_run(path, "reduce='masked_mean' read the mask 'attention_mask' there but reads 'm' here"),
        NET,
        None,
        padded,
        SITES,
        path=path,
        reduce="masked_mean",
        mask_key="m",
    )


_SCALE = 2.0


def _helper(v):
    return v.amax(1)


def test_fingerprint_sees_code_constants_defaults_closures_and_globals(monkeypatch):
    import functools

    from tdfunc.latent._cache_id import fingerprint as fp

    def at(k):
        return lambda v: v[:, k]

    def scaled(s):
        return lambda v: v * s

    def with_default(v, k=1):
        return v[:, k]

    def uses_global(v):
        return v * _SCALE

    def uses_helper(v):
        return _helper(v)

    class Scale:
        def __init__(self, s):
            self.s = s

        def __call__(self, v):
            return v * self.s

    assert fp(lambda v: v.amax(1)) == fp(lambda v: v.amax(1)) != fp(lambda v: v.amin(1)) != fp(lambda v: v.amin(2))
    assert fp(at(1)) == fp(at(1)) != fp(at(2))
    assert fp(scaled(torch.ones(3))) == fp(scaled(torch.ones(3))) != fp(scaled(torch.full((3,), 2.0)))
    assert fp(functools.partial(torch.amax, dim=1)) != fp(functools.partial(torch.amax, dim=2))
    assert fp(Scale(2)) == fp(Scale(2)) != fp(Scale(3))
    probe = nn.Linear(8, 2)
    before = fp(probe)
    with torch.no_grad():
        probe.weight[0, 0] += 1
    assert fp(probe) != before
    seen = fp(with_default), fp(uses_global), fp(uses_helper)
    with_default.__defaults__ = (2,)
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
    monkeypatch.setattr(sys.modules[__name__], "_helper", lambda v: v.amin(1))
    assert all(a != b for a, b in zip(seen, (fp(with_default), fp(uses_global), fp(uses_helper))))


# ------------------------------------------------------------------------------------- damage and I/O


def test_damaged_files_and_record_are_cache_errors(tmp_path):
    path = str(tmp_path / "c")
    tdfunc.latent.cache_activations(NET, None, DATA, SITES, path=path, progress=False)
    f1, f2, rec = (os.path.join(path, f) for f in ("1.memmap", "2.memmap", "cache.json"))
    os.truncate(f1, 100)
    fix = "delete the directory or pass a new path to start a new cache."
    _raises(
        f"{FN}: the file {f1!r} of entry '1' holds 100 bytes but the record says 30 rows = 5760 bytes: it was "
        f"truncated or replaced outside tdfunc; {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )
    assert os.path.getsize(f1) == 100  # not silently extended
    os.remove(f2)
    _raises(
        f"{FN}: the file {f1!r} of entry '1' holds 100 bytes but the record says 30 rows = 5760 bytes: it was "
        f"truncated or replaced outside tdfunc; {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )
    os.truncate(f1, 5760)
    _raises(
        f"{FN}: the file {f2!r} of entry '2' is missing from the cache at {path!r} (the record says 30 rows, "
        f"2160 bytes); {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )
    with open(rec, "w") as f:
        f.write('{"version": 2, "sites": ["')
    _raises(
        f"{FN}: the record {rec!r} is not valid JSON (Unterminated string starting at: line 1 column 26 (char "
        f"25)): it was torn or edited outside tdfunc, so what the cache holds is unknown; {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )
    with open(rec, "w") as f:
        f.write('{"version": 1}')
    _raises(
        f"{FN}: the record {rec!r} lacks entries of a tdfunc activation cache (needs ['version', 'sites', "
        f"'reduce', 'spec', 'batches_done', 'rows_done', 'complete']); {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )
    path = str(tmp_path / "d")
    _interrupted(path)
    with open(os.path.join(path, "cache.json")) as f:
        old = {**json.load(f), "version": 1}
    with open(os.path.join(path, "cache.json"), "w") as f:
        json.dump(old, f)
    _raises(
        f"{FN}: the cache at {path!r} has format version 1, this tdfunc writes version 2 (which records what "
        f"identifies the run); {fix}",
        NET,
        None,
        DATA,
        SITES,
        path=path,
    )


def test_disk_full_and_other_os_errors_are_cache_errors(tmp_path, monkeypatch):
    import tdfunc.latent._cache_io as IO

    path = str(tmp_path / "c")
    write_rows, preallocate, write_json = IO.write_rows, IO.preallocate, IO.write_json
    calls = []

    def full(target, *args):
        calls.append(target)
        if len(calls) == 7:  # batch 2's first file
            raise OSError(errno.ENOSPC, "No space left on device", target)
        return write_rows(target, *args)

    monkeypatch.setattr(IO, "write_rows", full)
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(NET, None, DATA, SITES, path=path, progress=False)
    assert str(e.value) == (
        f"{FN}: writing rows 10.. of the cache at {path!r} failed: no space left on the device "
        f"holding {path!r} ([Errno 28] No space left on device: '{path}/0.memmap'); free some "
        "space and call again with the same arguments: the cache resumes after the last recorded "
        "batch."
    )
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    monkeypatch.setattr(IO, "write_rows", write_rows)
    _resume_and_check(path, 2)

    path = str(tmp_path / "d")
    monkeypatch.setattr(IO, "preallocate", lambda target, n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(NET, None, DATA, SITES, path=path, progress=False)
    assert str(e.value) == (
        f"{FN}: creating the cache at {path!r} failed: no space left on the device holding "
        f"{path!r} ([Errno 28] No space); free some space and call again with the same arguments: "
        "the cache resumes after the last recorded batch."
    )
    assert not os.path.exists(path) and os.listdir(tmp_path) == ["c"]  # nothing half-built left
    monkeypatch.setattr(IO, "preallocate", preallocate)

    calls.clear()

    def denied(target, record):
        calls.append(target)
        if len(calls) == 2:  # the progress record after batch 0 (the first is the new cache's own)
            raise PermissionError(errno.EACCES, "Permission denied")
        return write_json(target, record)

    monkeypatch.setattr(IO, "write_json", denied)
    with pytest.raises(CacheError) as e:
        tdfunc.latent.cache_activations(NET, None, DATA, SITES, path=path, progress=False)
    assert str(e.value) == (
        f"{FN}: recording progress in {os.path.join(path, 'cache.json')!r} failed: [Errno 13] "
        f"Permission denied; check that {path!r} is writable (permissions, a mounted file system, "
        "free space) and call again with the same arguments to resume, or pass another path."
    )
    assert isinstance(e.value.__cause__, PermissionError)
    monkeypatch.setattr(IO, "write_json", write_json)
    _resume_and_check(path, 0)


# ------------------------------------------------------------------------------------- two writers


def _writer(path, barrier, finished, results):  # a spawned process: one of two writing the same cache
    class Holding(NoLen):  # the winner holds the cache at batch 1 until the other process has given up
        def __len__(self):
            return len(self.data)

        def __iter__(self):
            for i, b in enumerate(self.data):
                if i == 1:
                    finished.wait(30)
                yield b

    barrier.wait(60)
    try:
        tdfunc.latent.cache_activations(NET, None, Holding(DATA), SITES, path=path, progress=False)
        results.put(("ok", os.getpid(), ""))
    except CacheError as e:
        results.put(("error", os.getpid(), str(e)))


def test_two_processes_one_writer(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "c")
    barrier, finished, results = ctx.Barrier(2), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, barrier, finished, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        first = results.get(timeout=120)
        finished.set()
        second = results.get(timeout=60)
    finally:
        finished.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    (lost, loser, msg), (won, winner, _) = sorted([first, second])
    assert (lost, won) == ("error", "ok") and loser != winner
    assert msg == (
        f"{FN}: another process is writing this cache (pid {winner}) at {path!r}; wait until it finishes "
        "and call again (a complete cache is then loaded), or pass another path."
    )
    _resume_and_check(path, 6)
