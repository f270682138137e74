"""mkdocs hook: the notebooks in ``notebooks/`` become pages ``tutorials/<name>.ipynb``.

``tests/test_notebooks.py`` executes every notebook and writes the executed copy to
``notebooks/.executed/<name>`` (git-ignored).  The site renders that copy when it exists and is not older
than the notebook (outputs and figures of the last test run), and the stored notebook otherwise, so
``make docs`` works on its own and never runs a model (the SmolLM2 notebook needs a ~36 s conversion
and ~30 s of compute).  The chosen file is staged under ``.cache/docs-notebooks/tutorials/`` so that
mkdocs-jupyter sees an ordinary source file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = NOTEBOOKS / ".executed"
STAGE = ROOT / ".cache" / "docs-notebooks"


def notebook_sources() -> dict[str, Path]:
    """``{name: path}`` of each notebook, the executed copy preferred when it is not older."""
    out = {}
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        run = EXECUTED / nb.name
        use_run = run.exists() and run.stat().st_mtime >= nb.stat().st_mtime
        out[nb.name] = run if use_run else nb
    return out


@event_priority(50)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    shutil.rmtree(STAGE, ignore_errors=True)
    (STAGE / "tutorials").mkdir(parents=True)
    for name, path in notebook_sources().items():
        shutil.copyfile(path, STAGE / "tutorials" / name)
        files.append(File(f"tutorials/{name}", str(STAGE), config.site_dir, config.use_directory_urls))
    return files
