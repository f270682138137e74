"""AttnLRP on a transformers Llama: ``tdfunc.lrp(..., composite="attnlrp")`` vs plain input x gradient (and LXT).

Model: SmolLM2-135M-Instruct (Llama, 30 layers, d 576, 9 heads / 3 KV heads; ``notebooks/assets.py``'s weights,
eager attention, float32), prompts "The capital of France is" (T = 5) and a 40-token sentence; the relevance of
``inputs_embeds`` for the logit of the next token.  Variants (reference: input x gradient, the floor: one forward
and one backward, no rule):

- ``input x gradient``: ``emb.requires_grad_()``, ``g = torch.autograd.grad(logit, emb)``, ``emb * g`` (the
  gradient of the input only, as tdfunc takes it: no weight gradients);
- ``attnlrp no_grad``: ``tdfunc.lrp(f, td, model, composite="attnlrp")`` under ``torch.no_grad()`` (one forward
  that records and rewrites, one vector-Jacobian product);
- ``attnlrp exact``: the same with grad mode on (two forwards, so the relevance is exactly differentiable);
- ``attnlrp no_grad, eps=0 (LXT's rules)``: ``rules`` for LXT's ε → 0 limit (``epsilon(0.0)`` on ``nn.Linear``,
  which is then left on its gradient, ``uniform(0.0)`` on the products): the same computation as LXT's;
- ``lxt efficient`` (only where ``lxt.efficient`` imports, i.e. with transformers 4.x): LXT 2.1's
  ``monkey_patch(modeling_llama)``, then input x gradient as above.  LXT's patches are global, so they are swapped in for
  its calls only and the variants stay interleaved in one process.

LXT runs only beside transformers 4.x; its number comes from the same script in that environment::

    /tmp/lxt-venv/bin/pip install tensordict==0.15.3 einops tqdm      # see tools/lxt_reference.py for the venv
    PYTHONPATH=. /tmp/lxt-venv/bin/python -m bench.run --only attnlrp --threads 1

Checked before timing: no_grad equals exact; with LXT, tdfunc with LXT's ε → 0 rules equals LXT's relevance.
``--quick``: a Llama from a config (2 layers, d 64, 4 / 2 heads, T 8).
Run: ``python -m bench.run --only attnlrp --threads 1``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from bench.harness import Bench

NAME = "attnlrp"
LONG = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, and on the night of the "
    "great storm he saw a small boat struggling against the waves near the"
)


def _smollm2():
    import transformers

    path = Path(__file__).resolve().parents[1] / "notebooks" / "assets.py"
    spec = importlib.util.spec_from_file_location("notebook_assets", path)
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)  # type: ignore[union-attr]
    target = assets.ensure_smollm2()
    model = transformers.LlamaForCausalLM.from_pretrained(target, attn_implementation="eager").float().eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(target)
    except ValueError:  # transformers 4.x (the LXT environment) does not know 5.x's tokenizer class name
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(target) / "tokenizer.json"))
    prompts = [tok("The capital of France is", return_tensors="pt").input_ids, tok(LONG, return_tensors="pt").input_ids]
    return model, prompts, "SmolLM2-135M (30 layers, d 576)"


def _tiny():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, [torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))], "Llama (2 layers, d 64)"


class _LXT:
    """LXT's efficient-mode patches of transformers' Llama, swapped in only while its variant runs."""

    def __init__(self):
        import sys
        import tempfile

        from torch import nn
        from transformers.models.llama import modeling_llama as ml

        try:
            import torchvision  # noqa: F401
        except ImportError:  # LXT's ViT patches import it: a stub (see tools/lxt_reference.py)
            d = Path(tempfile.mkdtemp()) / "torchvision"
            (d / "models").mkdir(parents=True)
            (d / "__init__.py").write_text("")
            (d / "models" / "__init__.py").write_text("")
            (d / "models" / "vision_transformer.py").write_text("from torch import nn\n")
            sys.path.insert(0, str(d.parent))
        from lxt.efficient import monkey_patch

        self.slots = [
            (ml.LlamaMLP, "forward"),
            (ml.LlamaRMSNorm, "forward"),
            (nn.Dropout, "forward"),
            (ml, "eager_attention_forward"),
            (ml, "ALL_ATTENTION_FUNCTIONS"),
        ]
        self.plain = [getattr(o, a) for o, a in self.slots]
        monkey_patch(ml)
        self.patched = [getattr(o, a) for o, a in self.slots]
        self._set(self.plain)

    def _set(self, values):
        for (o, a), v in zip(self.slots, values):
            setattr(o, a, v)

    def relevance(self, model, emb, target):
        self._set(self.patched)
        try:
            e = emb.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(inputs_embeds=e).logits[0, -1, target], e)
            return e * g
        finally:
            self._set(self.plain)


def _lxt():
    try:
        import transformers

        if int(transformers.__version__.split(".")[0]) >= 5:
            return None  # lxt.efficient does not import with transformers 5.x
        return _LXT()
    except ImportError:
        return None


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    from tensordict import TensorDict

    import tdfunc

    bench = Bench(
        NAME,
        device=device,
        quick=quick,
        rounds=5,
        warmup=1,
        quick_rounds=2,
        quick_warmup=0,
        max_seconds_per_case=240.0,
        quick_max_seconds_per_case=6.0,
    )
    model, prompts, label = _tiny() if quick else _smollm2()
    model = model.to(device)
    lxt = _lxt()
    L = tdfunc.lrp_rules
    for ids in prompts:
        ids = ids.to(device)
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)
            target = int(model(ids).logits[0, -1].argmax())
        td = TensorDict({"e": emb}, batch_size=[1])
        f = lambda t, target=target: model(inputs_embeds=t["e"]).logits[:, -1, target]  # noqa: E731

        def ixg(emb=emb, target=target):
            e = emb.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(inputs_embeds=e).logits[0, -1, target], e)
            return e * g

        def no_grad(td=td, f=f):
            with torch.no_grad():
                return tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"][0]

        def exact(td=td, f=f):
            return tdfunc.lrp(f, td, model, composite="attnlrp")["attr", "e"][0].detach()

        lxt_rules = {  # LXT's efficient mode is the ε → 0 limit: linear layers keep their gradient
            torch.nn.Linear: L.epsilon(0.0),
            "model.layers.*.self_attn/matmul": L.uniform(0.0),
            "model.layers.*.mlp/mul": L.uniform(0.0),
        }

        def no_grad_eps0(td=td, f=f):
            with torch.no_grad():
                return tdfunc.lrp(f, td, model, composite="attnlrp", rules=lxt_rules)["attr", "e"][0]

        variants = {
            "input x gradient": ixg,
            "attnlrp no_grad": no_grad,
            "attnlrp exact": exact,
            "attnlrp no_grad, eps=0 (LXT's rules)": no_grad_eps0,
        }
        bench.check_equal({"attnlrp no_grad": no_grad(), "attnlrp exact": exact()}, atol=1e-5, rtol=1e-4)
        notes = {}
        if lxt is not None:
            like = no_grad_eps0()
            ref = lxt.relevance(model, emb, target)
            err = float((like - ref).abs().max() / ref.abs().max().detach())
            print(f"tdfunc (eps -> 0 rules) vs LXT efficient, T={ids.shape[1]}: max rel. error {err:.2e}")
            notes = {"lxt efficient": f"tdfunc with eps->0 rules equals it to {err:.1e} (relative to max |R|)"}
            variants["lxt efficient"] = lambda emb=emb, target=target: lxt.relevance(model, emb, target)
        bench.time(
            f"{label}, T={ids.shape[1]}",
            variants,
            reference="input x gradient",
            also_vs=["lxt efficient"] if lxt is not None else [],
            params={"model": label, "tokens": ids.shape[1]},
            notes=notes,
        )
    return bench.rows
