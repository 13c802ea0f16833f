"""BatchNorm helpers: running a frozen model on its batch's statistics."""
import contextlib

from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def batch_statistics(model):
    """Within: every BatchNorm of ``model`` normalises with the current batch's
    mean and variance, and its running statistics stay as they are.

    OFD's authors (and mdistiller) run the teacher in train mode, so its BNs
    see batch statistics, on which the loss's margins rest; train mode would
    also move the teacher's running mean, variance and ``num_batches_tracked``,
    which a frozen teacher must keep (its evaluation, the teacher cache and
    every other method read them). Each BN is put in train mode with
    ``track_running_stats`` off for the duration, so it uses the batch's
    statistics and writes nothing; every other module keeps its mode (a
    teacher's dropout stays off). Both flags are restored on leaving, also
    when the body raises.

    Args:
        model: an ``nn.Module`` (a model, or a BatchNorm itself).

    Yields:
        ``model``.

    Example::

        with torch.no_grad(), batch_statistics(teacher):
            logits, feats = teacher(image)
    """
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    saved = [(module.training, module.track_running_stats) for module in norms]
    try:
        for module in norms:
            # Training without tracking: BatchNorm's forward then passes no running
            # buffers to F.batch_norm and skips num_batches_tracked.
            module.training = True
            module.track_running_stats = False
        yield model
    finally:
        for module, (training, tracking) in zip(norms, saved):
            module.training = training
            module.track_running_stats = tracking
