"""Parameters under a sharding engine, for code that keeps its own copy of them (the EMA and
epoch histories, :mod:`sstoken.history`).

A copy that is elementwise in the parameters (an EMA, a snapshot) can live as sharded as the
parameters do: each rank keeps the piece of every parameter it owns, and only saving and
loading need the whole tensor. Three layouts, told apart by the parameter itself:

* plain tensor (one process, DDP, ZeRO-1/2): the local piece is the parameter;
* DTensor (FSDP2 ``fully_shard``): the parameter is its shard, and DTensor arithmetic keeps it
  so; whole = ``full_tensor()`` (an all-gather);
* ZeRO-3 (``ds_tensor``): the rank's flat partition of the padded, flattened parameter;
  whole = all-gather of the partitions, cut to ``ds_numel``, viewed as ``ds_shape``.

Collective calls (:func:`whole`, :func:`refresh`) must run on every rank.
"""

from __future__ import annotations

import torch


def is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


def local(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's values of ``p`` (writing it changes them)."""
    return p.ds_tensor if is_zero3(p) else p


@torch.no_grad()
def whole(piece: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor (shape of the model's parameter) from every rank's ``piece``, a tensor
    laid out like ``local(p)``. A collective call under FSDP2 and ZeRO-3."""
    if type(piece).__name__ == "DTensor":
        return piece.full_tensor()
    if is_zero3(p):
        import torch.distributed as dist

        group = getattr(p, "ds_process_group", None)
        parts = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, piece.contiguous(), group=group)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape).clone()
    return piece.detach().clone()


@torch.no_grad()
def piece_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a whole tensor, laid out like ``local(p)`` (the inverse of
    :func:`whole`)."""
    q = local(p)
    full = full.to(device=q.device, dtype=q.dtype)
    if type(q).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, q.device_mesh, q.placements)
    if is_zero3(p):
        import torch.distributed as dist

        n = q.numel()
        start = dist.get_rank(getattr(p, "ds_process_group", None)) * n
        flat = full.reshape(-1)[start:start + n]
        out = torch.zeros_like(q)
        out[:flat.numel()] = flat
        return out
    return full.view_as(q)


@torch.no_grad()
def refresh(model, params: list[torch.Tensor]) -> None:
    """After the local pieces of ``params`` were written: make the engine read them at the
    next forward. ZeRO-3 keeps small ("persistent") parameters gathered between steps, and
    FSDP2 keeps its root module's parameters gathered after a forward; both are released here
    so that the next forward gathers the new values. Nothing to do for plain tensors."""
    zero3 = [p for p in params if is_zero3(p)]
    if zero3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in zero3 if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)
    if any(type(p).__name__ == "DTensor" for p in params):
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
