"""Type completeness of tdfunc's public API: pyright's ``--verifytypes`` score, failing under a minimum.

Usage: ``python .ci/type_completeness.py [MIN_PERCENT]`` (default 95) with the interpreter of the
project's venv, which has ``basedpyright`` (requirements-types.txt: pyright packaged with its own
Node.js, so pip installs it).  Run by ``make types``, part of ``make test``.

``--verifytypes`` ignores ``--pythonpath``: it resolves the package through the ``python`` found on
``PATH``, and it cannot follow setuptools' editable-install finder, so the venv's ``bin`` goes first
on ``PATH`` and the checkout on ``PYTHONPATH``.  ``--ignoreexternal``: unknown types that come from
torch or tensordict do not count against tdfunc.  Prints the score and, under the minimum, every
symbol whose type is unknown or ambiguous; exits 1 under the minimum, 2 if the tool did not run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tool() -> str | None:
    """The basedpyright (or pyright) executable next to this interpreter, else on PATH."""
    here = pathlib.Path(sys.executable).parent
    for name in ("basedpyright", "pyright"):
        exe = here / name
        if exe.exists():
            return str(exe)
    return shutil.which("basedpyright") or shutil.which("pyright")


def report() -> dict:
    """The ``typeCompleteness`` section of ``--verifytypes tdfunc --ignoreexternal --outputjson``."""
    exe = tool()
    if exe is None:
        print(
            "type completeness: neither basedpyright nor pyright is installed (pip install -r requirements-types.txt)"
        )
        sys.exit(2)
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    # exit status 1 means "some symbols are incomplete", not a failure of the tool: judge by the JSON
    run = subprocess.run(
        [exe, "--verifytypes", "tdfunc", "--ignoreexternal", "--outputjson"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        out = json.loads(run.stdout)["typeCompleteness"]
    except (ValueError, KeyError):
        print(
            f"type completeness: {exe} gave no report (exit {run.returncode}):\n"
            f"{run.stdout[-2000:]}{run.stderr[-2000:]}"
        )
        sys.exit(2)
    if out.get("packageRootDirectory") != str(ROOT / "tdfunc"):
        print(f"type completeness: {exe} checked {out.get('packageRootDirectory')!r}, not {ROOT / 'tdfunc'}")
        sys.exit(2)
    return out


def main() -> None:
    minimum = float(sys.argv[1]) if len(sys.argv) > 1 else 95.0
    out = report()
    score = 100 * out["completenessScore"]
    counts = out["exportedSymbolCounts"]
    print(
        f"type completeness of tdfunc: {score:.1f}% ({counts['withKnownType']} exported symbols known, "
        f"{counts['withAmbiguousType']} ambiguous, {counts['withUnknownType']} unknown; minimum {minimum:g}%)"
    )
    if score < minimum:
        for s in out["symbols"]:
            if not s["isTypeKnown"] or s["isTypeAmbiguous"]:
                print(f"  {s['name']}")
                for d in s["diagnostics"]:
                    print(f"    {d['message'].splitlines()[0]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
