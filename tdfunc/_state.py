"""State: a module's parameters and buffers as a TensorDict, and its flattening for a call."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, is_non_tensor
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from ._errors import StateError, TdfuncTypeError, public, suggest

__all__ = ["state", "flat_state", "written_buffers", "unwrap"]


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]

_FSDP_FIX = (
    "gather the full state (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
    "options=StateDictOptions(full_state_dict=True))) and run tdfunc on the model built without fully_shard "
    "with it loaded (load_state_dict), or call with state=None (the sharded model's own forward)"
)


def _fsdp_error(module: nn.Module, key: str) -> StateError:
    return StateError(
        f"{type(module).__name__} is sharded with FSDP2 (fully_shard): its tensor {key!r} is a DTensor. A "
        "functional call with a state would swap its parameters under FSDP's own unshard / reshard hooks (all-zero "
        f"gradients, a module left broken), so tdfunc refuses it; {_FSDP_FIX}."
    )


def _check_not_sharded(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    for k, t in tensors.items():
        if isinstance(t, DTensor):
            raise _fsdp_error(module, k)


_OFFLOAD_WORKS = "captures, edits, patch / path_patch, cache_activations and generate_greedy (no torch.func transform)"


def _hooks(m: nn.Module) -> list[Any]:
    """accelerate's hooks on ``m`` (``_hf_hook``, a ``SequentialHook`` unpacked); none without accelerate."""
    h = getattr(m, "_hf_hook", None)
    return [] if h is None else list(getattr(h, "hooks", [h]))


def _offloaded(module: nn.Module) -> tuple[str, bool] | None:
    """The first submodule accelerate offloads (weights loaded only during its forward), and whether its hook
    holds a tied-parameter map (``dispatch_model``, a ``device_map`` with 'cpu' / 'disk'); None if there is none."""
    for name, m in module.named_modules():
        for h in _hooks(m):
            if getattr(h, "offload", False):
                return name, getattr(h, "tied_params_map", None) is not None
    return None


def _offload_state_error(module: nn.Module, key: str, where: str) -> StateError:
    return StateError(
        f"{type(module).__name__} is offloaded by accelerate (submodule {where!r}): its tensor {key!r} lives "
        "on the meta device and accelerate's hooks load it only during the forward, so a state cannot replace it "
        f"(accelerate fails with a TypeError). Call with state=None: {_OFFLOAD_WORKS} work; for a state (gradients "
        "over the weights, weight edits) load the model without offload."
    )


def _check_offload_transform(module: nn.Module) -> None:
    """Inside a torch.func transform, refuse a model accelerate dispatched with offloaded modules."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is None:
        return
    if getattr(module, "_hf_hook", None) is None:  # dispatch_model / cpu_offload hook the root too: O(1) for others
        return
    found = _offloaded(module)
    if found is not None and found[1]:
        raise StateError(
            f"{type(module).__name__} is dispatched by accelerate with offloaded modules (submodule "
            f"{found[0]!r}: weights loaded from 'cpu' / 'disk' during its forward), and this call runs inside a "
            "torch.func transform (grad, vjp, vmap: every gradient method, vmap sweeps such as patching_sweep). "
            "accelerate's hooks read the data pointers of the tensors they move, which tensors inside a transform "
            f"do not have, so it would fail inside accelerate. What works on offloaded models: {_OFFLOAD_WORKS}. "
            "For gradient methods load the model without offload (a device_map without 'cpu' / 'disk'), or offload "
            "with accelerate.cpu_offload(model), whose hooks hold no tied-parameter map."
        )


#: wrappers whose forward runs one inner module: DistributedDataParallel, DataParallel, torch.compile's
_WRAPPERS: tuple[type, ...] = (DistributedDataParallel, nn.DataParallel, OptimizedModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``ddp.module``, ``data_parallel.module``, ``torch.compile(m)._orig_mod``, repeatedly.

    Every tdfunc call takes the wrapped model as the model inside (the same state keys and sites,
    no ``module.`` / ``_orig_mod.`` prefix), and runs the inner model's forward: without DDP's
    buffer broadcast and gradient hooks (a tdfunc call is local to its rank), and eagerly (compile
    the tdfunc call instead).  Other modules are returned as they are.
    """
    while isinstance(module, _WRAPPERS):
        inner = module._orig_mod if isinstance(module, OptimizedModule) else module.module
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


@public("tdfunc.state")
def state(module: nn.Module, *, copy: bool = False) -> TensorDict:
    """A module's parameters and buffers as a TensorDict mirroring the module tree.

    ``state(model)[("layers", "0", "weight")]`` is ``model.layers[0].weight`` as a plain tensor
    (``requires_grad=False``, not an ``nn.Parameter``).  By default the tensors **share storage
    with the module** (no copy): writing into them in place writes into the model.  No tdfunc
    function ever writes into a state; weight interventions return new TensorDicts.  Pass
    ``copy=True`` for an independent copy.

    Stacked states work as ensembles under ``vmap``:
    ``torch.func.vmap(lambda s: tdfunc.functional_call(model, s, (x,)))(torch.stack([s1, s2]))``.

    A wrapped model (``DistributedDataParallel``, ``nn.DataParallel``, ``torch.compile(model)``)
    gives the inner model's state, with the same keys (no ``module.`` / ``_orig_mod.`` prefix), and
    every tdfunc call takes the wrapper as the inner model (:func:`tdfunc.functional_call` runs the
    inner forward: no DDP buffer broadcast or gradient hooks).

    Args:
        module: any ``nn.Module``.
        copy: clone every tensor instead of sharing storage.

    Returns:
        A TensorDict with ``batch_size=[]``; tied parameters appear once, under their first name.

    Example:
        >>> import torch, tdfunc
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> s = tdfunc.state(net)
        >>> s["0", "weight"].shape, s["1", "running_mean"].shape
        (torch.Size([2, 3]), torch.Size([2]))
        >>> s["0", "weight"].requires_grad, type(s["0", "weight"]) is torch.Tensor
        (False, True)

    Composes with: ``TensorDict.stack`` / ``torch.stack`` (ensembles under ``vmap``), ``grad`` over the state.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"tdfunc.state: expected an nn.Module, got {type(module).__name__} ({module!r:.60}); "
            "pass the model itself, e.g. tdfunc.state(model)."
        )
    if not isinstance(copy, bool):
        raise TypeError(f"tdfunc.state: copy must be True or False, got {type(copy).__name__} ({copy!r:.60}).")
    module = unwrap(module)  # DistributedDataParallel, DataParallel, torch.compile: the inner model's keys
    nested: dict = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if isinstance(t, DTensor):
            raise _fsdp_error(module, name)
        *path, leaf = name.split(".")
        d = nested
        for seg in path:
            d = d.setdefault(seg, {})
        t = t.detach()
        d[leaf] = t.clone() if copy else t
    return TensorDict(nested, batch_size=[])


def _flatten(td: TensorDictBase, prefix: str, out: dict) -> dict:
    # A plain walk over the leaves: ~3x faster than items(include_nested=True, leaves_only=True).
    items = td._tensordict.items() if type(td) is TensorDict else td.items()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, TensorDictBase) and not is_non_tensor(v):
            _flatten(v, prefix + k + ".", out)
        else:
            raise StateError(f"state entry {prefix + k!r} is a {type(v).__name__}, expected a tensor.")
    return out


#: per module: its tensors by dotted name (tied ones under every name), to check a state's keys and shapes
_TENSORS: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    if not torch.compiler.is_compiling():
        _TENSORS[module] = tensors
        _OWNERS.pop(module, None)  # the module may have changed: find the buffers' owners again
    return tensors


#: per module: (dotted prefix, submodule) of every submodule that owns buffers
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module]]]" = weakref.WeakKeyDictionary()


def _owners(module: nn.Module) -> list[tuple[str, nn.Module]]:
    owners: list[tuple[str, nn.Module]] = []

    def visit(m: nn.Module, prefix: str) -> None:
        if m._buffers:
            owners.append((prefix, m))
        for k, child in m._modules.items():
            if child is not None:
                visit(child, prefix + k + ".")

    visit(module, "")
    if not torch.compiler.is_compiling():
        _OWNERS[module] = owners
    return owners


def written_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own buffers that a forward may write: those of submodules in training mode.

    (BatchNorm updates its running statistics in place in training mode.)  A call runs on clones
    of these, so neither the module nor a state sharing its storage is written.
    """
    owners = None if torch.compiler.is_compiling() else _OWNERS.get(module)
    if owners is None:
        owners = _owners(module)
    out: dict[str, torch.Tensor] = {}
    for prefix, m in owners:
        if m.training:
            for k, b in m._buffers.items():
                if b is not None:
                    out[prefix + k] = b
    return out


def _check_shape(module: nn.Module, k: str, v: torch.Tensor, own: torch.Tensor) -> None:
    if v.shape == own.shape:
        return
    shape, want = tuple(v.shape), tuple(own.shape)
    if len(shape) == len(want) + 1 and shape[1:] == want:
        raise StateError(
            f"state entry {k!r} has shape {shape}, a stack of {shape[0]} of {type(module).__name__}'s "
            f"{want}; a stacked state (an ensemble) runs under torch.func.vmap, e.g. "
            "vmap(lambda s: tdfunc.functional_call(model, s, args))(stacked), or select one member with state[i]."
        )
    raise StateError(
        f"state entry {k!r} has shape {shape}, but {type(module).__name__}'s tensor of that name has "
        f"shape {want}; give a tensor of shape {want} (a state built with tdfunc.state(model))."
    )


def flat_state(module: nn.Module, state: TensorDictBase | Mapping | None) -> dict[str, torch.Tensor]:
    """Dotted-name dict of a (partial) state, checked against the module's tensor names."""
    module = unwrap(module)
    _check_offload_transform(module)
    if state is None:
        return {}
    if isinstance(state, TensorDictBase):
        flat = _flatten(state, "", {})
    elif isinstance(state, Mapping):
        flat = (
            dict(TensorDict(dict(state), batch_size=[]).flatten_keys(".").items())
            if any(isinstance(v, Mapping) for v in state.values())
            else dict(state)
        )
    else:
        raise TdfuncTypeError(
            f"state must be a TensorDict (tdfunc.state(model)), a mapping of dotted names to tensors, "
            f"or None, got {type(state).__name__} ({state!r:.60})."
        )
    if torch.compiler.is_compiling():
        return flat
    tensors = _TENSORS.get(module)
    if tensors is not None:  # the fast path: every entry is a tensor of the cached name and shape
        for k, v in flat.items():
            own = tensors.get(k)
            if (
                own is None
                or not isinstance(v, torch.Tensor)
                or isinstance(v, DTensor)
                or isinstance(own, DTensor)
                or own.is_meta
                or v.shape != own.shape
                or v.dtype != own.dtype
                or v.device != own.device
            ):
                break
        else:
            return flat
    tensors = _tensors(module)  # first call, or the module may have changed since it was cached: look again
    _check_not_sharded(module, tensors)  # FSDP2: a state would be swapped under its hooks
    _check_not_sharded(module, {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)})
    metas = [k for k in flat if k in tensors and tensors[k].is_meta]
    if metas:  # accelerate offload: the module's own tensors are placeholders its hooks fill during the forward
        found = _offloaded(module)
        if found is not None:
            raise _offload_state_error(module, metas[0], found[0])
    for k, v in flat.items():
        if k not in tensors:
            raise StateError(
                f"unknown state key {k!r}: {type(module).__name__} has no parameter or buffer of that "
                f"name.{suggest(k, tensors)} Build the state with tdfunc.state(model) or select from it."
            )
        if not isinstance(v, torch.Tensor):
            raise StateError(f"state entry {k!r} is a {type(v).__name__}, expected a tensor.")
        _check_shape(module, k, v, tensors[k])
    odd = [k for k, v in flat.items() if _differs(v, tensors[k])]
    if odd:
        _check_consistent(module, flat, tensors, odd[0])
    return flat


def _differs(v: torch.Tensor, own: torch.Tensor) -> bool:
    float_pair = v.is_floating_point() and own.is_floating_point()
    return (float_pair and v.dtype != own.dtype) or v.device != own.device


def _check_consistent(module: nn.Module, flat: dict, tensors: dict, k: str) -> None:
    """An entry of another dtype / device than the module's is fine when the whole call runs in it.

    (A float64 state on a float32 module, with float64 inputs, is a float64 call.)  Refused when the
    call would mix: the other entries, or the module's tensors the state leaves out, differ.
    """
    given = {id(tensors[n]) for n in flat}  # tied names follow the entry given for them
    used = list(flat.values()) + [t for n, t in tensors.items() if n not in flat and id(t) not in given]
    floats = sorted({str(t.dtype) for t in used if t.is_floating_point()})
    devices = sorted({str(t.device) for t in used})
    if len(floats) <= 1 and len(devices) <= 1:
        return
    v, own = flat[k], tensors[k]
    raise StateError(
        f"state entry {k!r} has dtype {v.dtype} on {v.device}, but {type(module).__name__}'s tensor of that "
        f"name has dtype {own.dtype} on {own.device}, and the call would mix dtypes {floats} on devices {devices}; "
        f"convert the entry (.to({own.dtype}, {str(own.device)!r})), or the whole state and the inputs together "
        "(state.to(dtype, device)), so the call runs in one dtype on one device."
    )
