"""Small wrappers over torch.distributed that also work in a single process."""
import os

import torch
import torch.distributed as dist


def is_distributed():
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank():
    """This process's index on its node (torchrun's LOCAL_RANK); the global rank
    when no launcher set it."""
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def is_main_process():
    return get_rank() == 0


def all_gather_cat(tensor):
    """Concatenate ``tensor`` from every process along dim 0 (same shape on all).

    No gradient flows through the result; use it for state updates such as
    memory banks.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor):
    """Sum ``tensor`` over processes in place and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters):
    """Average the gradients of ``parameters`` over processes (for modules kept
    outside DistributedDataParallel, such as a GAN discriminator)."""
    if not is_distributed():
        return
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def barrier():
    if is_distributed():
        dist.barrier()


def broadcast_from_main(tensors):
    """Overwrite ``tensors`` on every process with rank 0's values, in place.

    Tensors of one dtype travel in one message. Used for BatchNorm running
    statistics: each process's last forward moved its own, and the saved
    model is rank 0's.
    """
    if not is_distributed():
        return
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([tensor.detach().reshape(-1) for tensor in group])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(group, [part.view_as(tensor) for part, tensor in
                                     zip(flat.split([t.numel() for t in group]), group)])


def convert_sync_batchnorm(module, skip=("teacher",)):
    """Replace every BatchNorm under ``module`` by SyncBatchNorm, except in the
    children whose names start with one of ``skip`` (a frozen teacher keeps its
    own: it runs in eval mode and is never trained).

    Returns:
        ``module``, changed in place (its parameters and buffers are kept).
    """
    for name, child in list(module.named_children()):
        if not name.startswith(tuple(skip)):
            setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return module
