"""Full weights of a model sharded by FSDP2 (``fully_shard``): gathered for members and anchors, scattered
back for a cycle start.

Under ``accelerate``'s FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``, or ``fsdp=True`` in the
config) every parameter is a ``DTensor`` of which each process holds one shard, and the Trainer's model IS the
sharded module. Everything the trainer reads or writes as whole weights goes through this module instead of
``state_dict()`` / ``load_state_dict()``; each function is a collective (every process calls it, in the same
order):

* :func:`full_state_dict` gathers the full tensors onto the main process's CPU (torch's
  ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``); the other processes get ``{}``.
  A member is saved from it (``save_pretrained(state_dict=...)`` on the main process), and StarSSE's anchor
  (model 1) and Local DE's (the original weights) ARE such a dict: one full copy in the main process's CPU
  memory, none on the accelerators;
* :func:`load_full_state_dict` scatters the main process's full state dict into every process's shards
  (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``, strict): a cycle start;
* :func:`nonfinite_tensors` checks each process's own shards and gathers the names, so every process agrees
  whether a member may be written.

The optimizer needs nothing: it was built over the sharded parameters, and a cycle start clears its state in
place (``reset_optimizer``), on each process for its own shards.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["full_state_dict", "is_sharded", "load_full_state_dict", "nonfinite_tensors"]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by FSDP2 (``fully_shard`` on it or on any of its modules)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every tensor of `model`, whole, on the CPU of the main process (rank 0); ``{}`` on the
    others. Keys are the unsharded model's ``state_dict()`` keys (tied weights under both names)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    state = {name: tensor.detach().clone() for name, tensor in state.items()}
    # tied weights (an LM's output projection IS its input embedding) gather as separate copies: made one
    # tensor again, as in the unsharded model's state_dict(), so that save_pretrained writes it once
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state and first.setdefault(id(param), name) != name:
            state[name] = state[first[id(param)]]
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Collective: copy the main process's full `state` (:func:`full_state_dict`) into every process's shards;
    the other processes' `state` is not read (``{}``). A missing or unexpected name raises."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    problem = [None]
    if torch.distributed.get_rank() == 0:
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            problem = [f"Weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."]
    torch.distributed.broadcast_object_list(problem, src=0)  # every process raises, none waits
    if problem[0] is not None:
        raise ValueError(problem[0])
    # a copy: set_model_state_dict puts the model's sharded tensors into the dict it is given (the anchor is
    # loaded again at the next cycle start)
    set_model_state_dict(model, dict(state), options=_options(broadcast_from_rank0=True, strict=True))


@torch.no_grad()
def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Collective: names of the floating-point tensors holding a NaN or an Inf in any process's shard."""
    from torch.distributed.tensor import DTensor

    bad = []
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if torch.is_tensor(local) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, bad)
    return sorted({name for names in gathered for name in names or []})
