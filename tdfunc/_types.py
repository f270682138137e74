"""Type aliases used in public signatures."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from tensordict import TensorDictBase

from ._edits import Delta, Rule

#: A site string: ``"path"``, ``"path:input"``, ``"path:output.1"``, ``"path@2"``, ``"path@*"``, globs.
Site = str
#: What can happen at a site.
Edit = Union[torch.Tensor, Delta, Rule, Callable[[Any], Any]]
Edits = Mapping[Site, Edit]
Capture = Union[Site, Sequence[Site]]
State = Union[TensorDictBase, Mapping[str, torch.Tensor], None]
