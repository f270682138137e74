"""The one site-pattern grammar, used by every function that takes site (or state-entry) patterns.

A pattern is a dotted path whose segments may be globs, optionally followed by a site's
``":port"`` / ``"@call"`` suffix::

    "*"       any run of characters within one name segment ("blocks.*" -> "blocks.0", not "blocks.0.mlp")
    "?"       exactly one character within one name segment ("?" -> every one-character top-level name)
    "**"      a whole segment: any number of segments, none included ("**.mlp" -> "mlp", "blocks.0.mlp")

The path is matched segment by segment; a suffix (``":input"``, ``"@2"``, ``"@*"``) is not a glob and must
equal the key's own suffix.  ``tdfunc.functional_call`` / ``intervene`` / ``install_sites`` match patterns
against the module names, ``tdfunc.latent.patch`` / ``patching_sweep`` / ``path_patch`` against the keys
of captures, the weight family against state entries (a pattern naming a module selects its entries).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["GLOB_CHARS", "is_glob", "seg_match", "path_match", "split_site", "site_match", "entry_match"]

GLOB_CHARS = "*?"


def is_glob(path: str) -> bool:
    """Whether ``path`` holds a glob character (``*`` or ``?``)."""
    return any(c in path for c in GLOB_CHARS)


def seg_match(pat: str, s: str) -> bool:
    """Glob match of one name segment: ``*`` any run of characters, ``?`` one character."""
    if pat == "*" or pat == s:
        return True
    if "*" not in pat and "?" not in pat:
        return False
    return _glob(pat, s)


def _glob(pat: str, s: str) -> bool:
    if not pat:
        return not s
    if pat[0] == "*":
        return any(_glob(pat[1:], s[i:]) for i in range(len(s) + 1))
    if not s:
        return False
    return (pat[0] == "?" or pat[0] == s[0]) and _glob(pat[1:], s[1:])


def path_match(pats: Sequence[str], segs: Sequence[str]) -> bool:
    """Whether the name segments ``segs`` match the pattern segments ``pats`` (``"**"``: any number of segments)."""
    if "**" not in pats:  # the common case: one pattern segment per name segment
        return len(pats) == len(segs) and all(seg_match(p, s) for p, s in zip(pats, segs))
    return _deep_match(list(pats), list(segs))


def _deep_match(pats: list[str], segs: list[str]) -> bool:
    if not pats:
        return not segs
    if pats[0] == "**":
        return any(_deep_match(pats[1:], segs[i:]) for i in range(len(segs) + 1))
    return bool(segs) and seg_match(pats[0], segs[0]) and _deep_match(pats[1:], segs[1:])


def split_site(text: str) -> tuple[str, str]:
    """``(path, suffix)`` of a site string: ``"blocks.0.mlp:input@2"`` -> ``("blocks.0.mlp", ":input@2")``."""
    cut = len(text)  # a plain loop: dynamo cannot trace min() over a generator with a default
    for sep in (":", "@"):
        i = text.find(sep)
        if 0 <= i < cut:
            cut = i
    return text[:cut], text[cut:]


def site_match(pattern: str, key: str) -> bool:
    """Whether the site string ``key`` (a capture key) is matched by the site pattern ``pattern``."""
    if pattern == key:
        return True
    (pp, ps), (kp, ks) = split_site(pattern), split_site(key)
    return ps == ks and path_match(pp.split("."), kp.split("."))


def entry_match(pats: Sequence[str], key: Sequence[str]) -> bool:
    """Whether a state entry ``key`` (tuple path) or one of the modules holding it matches ``pats``.

    ``"fc1"`` and ``"*"`` select every entry of the matched modules, ``"**.weight"`` the entries themselves.
    """
    return any(path_match(pats, key[:i]) for i in range(len(key), 0, -1))
