"""Reference AttnLRP relevances from LXT 2.1's efficient mode, saved for ``tests/test_attnlrp_hf.py``.

LXT (the AttnLRP authors' library) monkey-patches transformers' Llama, Qwen2, GPT-2 and BERT classes; its
``lxt.efficient`` does not import with transformers 5.x, so this script runs in a separate environment and
saves what the tests compare with (they need neither LXT nor this environment)::

    python3.11 -m venv /tmp/lxt-venv
    /tmp/lxt-venv/bin/pip install torch==2.13.0 transformers==4.51.3
    /tmp/lxt-venv/bin/pip install --no-deps lxt==2.1
    /tmp/lxt-venv/bin/python tools/lxt_reference.py          # writes tests/data/attnlrp_lxt_*.pt

(LXT's ViT patches import ``torchvision``; a stub package is put on the path here if it is missing.)

``llama_cp``: the same Llama under LXT's ``cp_LRP`` map (CP-LRP: attention probabilities and the MLP gate held
constant).  For each model: a tiny config (float64, eager attention, seed 0), random token ids, and LXT's relevance of
the input embeddings for one logit per example, as LXT's documentation computes it: ``monkey_patch`` the
transformers module, then ``inputs_embeds * inputs_embeds.grad``.  Saved: the config keyword arguments, the
state dict, the ids, the targets, the logits and the relevance.  Versions: torch 2.13.0, transformers 4.51.3,
lxt 2.1.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"

#: model name -> (transformers class, config class, config keyword arguments, kind)
SPECS = {
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rms_norm_eps=1e-6,
            attention_bias=False,
        ),
        "causal",
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
        ),
        "causal",
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=32, n_inner=32),
        "causal",
    ),
    "bert": (
        "BertForSequenceClassification",
        "BertConfig",
        dict(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=3,
        ),
        "classifier",
    ),
}
SPECS["llama_cp"] = SPECS["llama"]  # CP-LRP: LXT's cp_LRP map (probabilities and the gate held constant)
MODULES = {
    "llama": "transformers.models.llama.modeling_llama",
    "llama_cp": "transformers.models.llama.modeling_llama",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
    "gpt2": "transformers.models.gpt2.modeling_gpt2",
    "bert": "transformers.models.bert.modeling_bert",
}


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        d = Path(tempfile.mkdtemp()) / "torchvision"
        (d / "models").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        (d / "models" / "__init__.py").write_text("")
        (d / "models" / "vision_transformer.py").write_text("from torch import nn\n")
        sys.path.insert(0, str(d.parent))


def reference(name: str) -> dict:
    """LXT's relevance on the tiny model ``name`` (patches that transformers module for this process)."""
    import importlib

    import transformers
    from lxt.efficient import monkey_patch

    cls_name, cfg_name, kwargs, kind = SPECS[name]
    module = importlib.import_module(MODULES[name])
    if name.endswith("_cp"):
        from lxt.efficient.models import llama as lxt_llama

        monkey_patch(module, lxt_llama.cp_LRP)
    else:
        monkey_patch(module)
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**kwargs, attn_implementation="eager")
    model = getattr(module, cls_name)(cfg).double().eval()  # the patched module's class (BERT: LXT's copy)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 6))
    n_out = kwargs.get("num_labels", kwargs["vocab_size"])
    targets = torch.randint(0, n_out, (2,))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    picked = (logits[:, -1] if kind == "causal" else logits).gather(-1, targets[:, None])[:, 0]
    picked.sum().backward()
    return {
        "config": kwargs,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ids": ids,
        "targets": targets,
        "logits": picked.detach(),
        "relevance": (emb * emb.grad).detach(),
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__), "lxt": "2.1"},
    }


def main() -> None:
    _stub_torchvision()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or SPECS:
        if len(sys.argv) == 1:  # one process per model: LXT's patches are global (nn.LayerNorm, nn.Dropout)
            os.system(f"{sys.executable} {__file__} {name}")
            continue
        torch.save(reference(name), OUT / f"attnlrp_lxt_{name}.pt")
        print(name, "->", OUT / f"attnlrp_lxt_{name}.pt")


if __name__ == "__main__":
    main()
