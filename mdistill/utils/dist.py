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
