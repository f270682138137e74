import os
import sys

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
