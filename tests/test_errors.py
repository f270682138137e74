"""Every bad-input error is pinned here, word for word.

Each message names the function, echoes the bad value, says what was expected and how to fix it.
"""

from __future__ import annotations

import re

import pytest
import torch
from models import MLP, Recurrent
from torch import nn

import tdfunc
from tdfunc import EditError, NotReachedError, SiteError, StateError

X = torch.randn(2, 6)


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x)


PINNED = [
    (
        "unknown_site",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["fc3"]),
        SiteError,
        "tdfunc.functional_call: unknown site 'fc3': MLP has no submodule 'fc3'. Did you mean 'fc2', 'fc1'? List the names with [n for n, _ in model.named_modules()].",
    ),
    (
        "unknown_site_install",
        lambda: tdfunc.install_sites(MLP(), ["nope"]),
        SiteError,
        "tdfunc.install_sites: unknown site 'nope': MLP has no submodule 'nope'. List the names with [n for n, _ in model.named_modules()].",
    ),
    (
        "glob_matches_nothing",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["blocks.*.mlp"]),
        SiteError,
        "tdfunc.functional_call: site pattern 'blocks.*.mlp' matches no submodule of MLP ('*' matches within one name segment, '**' across segments; top-level names: ['fc1', 'act', 'fc2', 'act2', 'head']).",
    ),
    (
        "bad_port",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["fc1:inptu"]),
        SiteError,
        "tdfunc.functional_call: bad site 'fc1:inptu': the port after ':' must be 'input' or 'output', got 'inptu'. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', 'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'.",
    ),
    (
        "bad_call_index",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["fc1@x"]),
        SiteError,
        "tdfunc.functional_call: bad site 'fc1@x': the call index after '@' must be a non-negative integer or '*', got 'x'. Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', 'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'.",
    ),
    (
        "empty_site",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=[""]),
        SiteError,
        "tdfunc.functional_call: bad site '': it names no module path (the root module's output is the call's return value). Sites look like 'blocks.0.mlp', 'blocks.0.mlp:input', 'blocks.0.mlp:output.1', 'blocks.0.mlp@2', 'blocks.0.mlp@*' or 'blocks.*.mlp'.",
    ),
    (
        "missing_input_element",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["fc1:input.2"]),
        SiteError,
        "tdfunc.functional_call: site 'fc1:input.2': the module's positional inputs are a value of type tuple of length 1, with no element 2; an input passed by keyword cannot be addressed; pass it positionally or edit another site.",
    ),
    (
        "substitute_shape",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": torch.zeros(3, 8)}),
        EditError,
        "tdfunc.functional_call: the substitute at site 'act' has shape (3, 8), but the site's value has shape (2, 8); give a tensor with a shape broadcastable to (2, 8).",
    ),
    (
        "substitute_dtype",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": torch.zeros(2, 8, dtype=torch.float64)}),
        EditError,
        "tdfunc.functional_call: the substitute at site 'act' has dtype torch.float64 on cpu, but the site's value has dtype torch.float32 on cpu; convert it with .to(value.dtype, value.device).",
    ),
    (
        "delta_shape",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": tdfunc.delta(torch.zeros(5))}),
        EditError,
        "tdfunc.functional_call: the delta at site 'act' has shape (5,), but the site's value has shape (2, 8); give a tensor with a shape broadcastable to (2, 8).",
    ),
    (
        "edit_returns_non_tensor",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": lambda v: 3}),
        EditError,
        "tdfunc.functional_call: the edit function's result at site 'act' is a value of type int (3), but the site holds a tensor of shape (2, 8), dtype torch.float32, device cpu; an edit must give a tensor of that shape.",
    ),
    (
        "edit_changes_shape",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": lambda v: v[0]}),
        EditError,
        "tdfunc.functional_call: the edit function's result at site 'act' has shape (8,), but the site's value has shape (2, 8); give a tensor with a shape equal to (2, 8).",
    ),
    (
        "edit_of_wrong_type",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"act": 3.0}),
        EditError,
        "tdfunc.functional_call: the edit at site 'act' is a value of type float (3.0); expected a Tensor (substitute the value), a callable fn(value) -> value, tdfunc.delta(t) (add t), tdfunc.from_site(site, fn) (compute it from another site) or tdfunc.rule(fn) (rewrite the module's output).",
    ),
    (
        "rule_at_input",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"fc1:input": tdfunc.rule(lambda *a: a[-1])}),
        EditError,
        "tdfunc.functional_call: tdfunc.rule edits rewrite a module's output, but site 'fc1:input' is an input; use the output site 'fc1' or a plain callable edit.",
    ),
    (
        "unknown_state_key",
        lambda: tdfunc.functional_call(MLP(), {"fc1.wieght": torch.zeros(8, 6)}, (X,)),
        StateError,
        "tdfunc.functional_call: unknown state key 'fc1.wieght': MLP has no parameter or buffer of that name. Did you mean 'fc1.weight', 'fc2.weight', 'head.weight'? Build the state with tdfunc.state(model) or select from it.",
    ),
    (
        "capture_call_index_too_large",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=["fc1@3"]),
        NotReachedError,
        "tdfunc.functional_call: nothing was captured at site 'fc1@3': the module ran once in this call, so it has no call 3. Capture a site the forward reaches.",
    ),
    (
        "capture_ambiguous_repeated_module",
        lambda: tdfunc.functional_call(Recurrent(), None, (torch.randn(5),), capture=["act"]),
        NotReachedError,
        "tdfunc.functional_call: site 'act' ran 3 times in this call, so a single capture is ambiguous; capture 'act@0' … 'act@2' for one call, or 'act@*' for all of them stacked on a new leading dimension.",
    ),
    (
        "capture_never_reached",
        lambda: tdfunc.functional_call(Skip(), None, (torch.randn(2),), capture=["unused"]),
        NotReachedError,
        "tdfunc.functional_call: nothing was captured at site 'unused': the module never ran in this call. Capture a site the forward reaches.",
    ),
    (
        "edit_never_reached",
        lambda: tdfunc.functional_call(Skip(), None, (torch.randn(2),), edits={"unused": tdfunc.delta(torch.zeros(2))}),
        NotReachedError,
        "tdfunc.functional_call: the edit at site 'unused' was never applied: the module never ran in this call. Check that the forward reaches this module (and with these inputs), or remove the edit.",
    ),
    (
        "intervene_edit_never_reached",
        lambda: tdfunc.intervene(lambda: 0, Skip(), edits={"a": torch.zeros(2)})(),
        NotReachedError,
        "tdfunc.intervene: the edit at site 'a' was never applied: the module never ran in this call. Check that the forward reaches this module (and with these inputs), or remove the edit.",
    ),
    (
        "capture_not_a_list",
        lambda: tdfunc.functional_call(MLP(), None, (X,), capture=3),
        TypeError,
        "tdfunc.functional_call: capture must be a site string or a list of site strings, got int (3); e.g. capture=['blocks.0.mlp', 'blocks.*.attn'].",
    ),
    (
        "edits_not_a_mapping",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits=["act"]),
        TypeError,
        "tdfunc.functional_call: edits must be a mapping from site to edit, got list (['act']); e.g. edits={'blocks.0.mlp': tdfunc.delta(v)}.",
    ),
    (
        "module_not_a_module",
        lambda: tdfunc.functional_call("m", None, (X,)),
        TypeError,
        "tdfunc.functional_call: expected an nn.Module as the module, got str ('m').",
    ),
    (
        "state_of_wrong_type",
        lambda: tdfunc.functional_call(MLP(), [1], (X,)),
        TypeError,
        "tdfunc.functional_call: state must be a TensorDict (tdfunc.state(model)), a mapping of dotted names to tensors, or None, got list ([1]).",
    ),
    (
        "delta_of_non_tensor",
        lambda: tdfunc.delta(0.0),
        TypeError,
        "tdfunc.delta: expected a torch.Tensor, got float (0.0); wrap the value with torch.as_tensor(...) first.",
    ),
    (
        "rule_of_non_callable",
        lambda: tdfunc.rule(3),
        TypeError,
        "tdfunc.rule: expected a callable fn(module, args, kwargs, output), got int (3).",
    ),
    (
        "state_of_non_module",
        lambda: tdfunc.state(3),
        TypeError,
        "tdfunc.state: expected an nn.Module, got int (3); pass the model itself, e.g. tdfunc.state(model).",
    ),
    (
        "intervene_non_callable",
        lambda: tdfunc.intervene(3, MLP()),
        TypeError,
        "tdfunc.intervene: expected a callable f, got int (3).",
    ),
    (
        "from_site_source_not_run_yet",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"fc1": tdfunc.from_site("head")}),
        NotReachedError,
        "tdfunc.functional_call: tdfunc.from_site at site 'fc1' needs the value of 'head', which has not run yet in this call; the source must be reached before the edited site.",
    ),
    (
        "from_site_glob_source",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"fc1": tdfunc.from_site("f*")}),
        SiteError,
        "tdfunc.functional_call: tdfunc.from_site source 'f*' at site 'fc1' is a glob; name one site.",
    ),
    (
        "from_site_shape",
        lambda: tdfunc.functional_call(MLP(), None, (X,), edits={"fc2": tdfunc.from_site("fc1:input")}),
        EditError,
        "tdfunc.functional_call: the from_site value at site 'fc2' has shape (2, 6), but the site's value has shape (2, 8); give a tensor with a shape equal to (2, 8).",
    ),
    (
        "from_site_source_not_a_string",
        lambda: tdfunc.from_site(3),
        TypeError,
        "tdfunc.from_site: source must be a site string, got int (3).",
    ),
]


@pytest.mark.parametrize("name, call, exc, message", PINNED, ids=[p[0] for p in PINNED])
def test_error_message_is_pinned(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message
    assert isinstance(info.value, tdfunc.TdfuncError) or exc is TypeError


def test_errors_leave_no_frame_and_no_change():
    m = MLP()
    ref = m(X)
    for _, call, exc, _ in PINNED:
        with pytest.raises(exc):
            call()
    assert torch.equal(m(X), ref)


def test_site_not_installed_inside_compile_names_the_call_to_make():
    m = MLP()
    torch._dynamo.reset()
    f = torch.compile(lambda x: tdfunc.functional_call(m, None, (x,), capture="fc2"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=re.escape("Call tdfunc.install_sites(model, ['fc2'])")):
        f(X)
    torch._dynamo.reset()
