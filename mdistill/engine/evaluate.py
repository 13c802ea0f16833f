"""Evaluation: top-1, top-5 and loss over a whole test set, exact across processes."""
import torch
import torch.nn.functional as F

from ..utils.dist import all_reduce_sum


def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k logits, for each k."""
    maxk = min(max(ks), logits.size(1))
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model_fn, loader, device, autocast=None):
    """Evaluate ``model_fn(image) -> logits`` on every batch of ``loader``.

    In a distributed run each process sees a disjoint shard; the sums are
    reduced so the result is exact over the whole set.

    Returns:
        ``{"top1": %, "top5": %, "loss": mean cross-entropy, "count": n}``.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in loader:
        image, target = batch["image"], batch["target"]
        if autocast is not None:
            with autocast():
                logits = model_fn(image)
        else:
            logits = model_fn(image)
        logits = logits.float()
        top1, top5 = topk_correct(logits, target)
        loss = F.cross_entropy(logits, target, reduction="sum")
        sums += torch.stack([top1.double(), top5.double(), loss.double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64,
                                          device=device)])
    all_reduce_sum(sums)
    top1, top5, loss, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "loss": loss / count, "count": int(count)}
