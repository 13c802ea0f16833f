"""The modern training recipe's batch transforms and the student's weight average.

What timm's ImageNet recipes add to a plain SGD run, taken from the libraries
that define them rather than rewritten:

* :class:`BatchRecipe`: resizing on the device (DATASET.RESIZE, bilinear and
  antialiased as torchvision's ``resize`` of a tensor), then Mixup/CutMix and
  label smoothing through ``timm.data.Mixup`` (DATASET.MIXUP.*, DATASET.CUTMIX.*,
  SOLVER.LABEL_SMOOTHING). The trainer applies it to the batch before the
  forward, so the teacher sees exactly the images the student sees, and hands
  the method the soft targets as ``target`` (``F.cross_entropy`` takes class
  probabilities); methods that read the hard labels otherwise are refused
  before the first step (:func:`~mdistill.engine.combinations.check_recipe`).
* :func:`build_ema`: timm's ``ModelEmaV3`` of the student (SOLVER.EMA.*),
  updated by the trainer after each accepted step.
"""
import torch
import torch.nn.functional as F


def resize_images(images, size):
    """``images`` ``[B, C, H, W]`` resized to ``size x size``: bilinear with
    antialiasing, as ``torchvision.transforms.v2.functional.resize`` does on a
    float tensor (half-pixel centres, no corner alignment)."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    if images.is_contiguous(memory_format=torch.channels_last):
        resized = resized.contiguous(memory_format=torch.channels_last)
    return resized


class BatchRecipe:
    """Resize, Mixup/CutMix and label smoothing of a training batch, on its device.

    Mixup and CutMix draw their weight once per batch from NumPy's global
    generator (timm's ``mode="batch"``), whose state the run checkpoint holds,
    so a resumed run mixes as an uninterrupted one. Each image is mixed with
    the one at the mirrored position of the batch. timm mixes even batches
    only; an odd one (the last of an epoch) mixes its first ``B - 1`` images
    and keeps the last one whole (its target smoothed alone).

    Args:
        num_classes: the number of classes of the soft targets.
        resize: the side to resize images to (0: off).
        mixup_alpha, cutmix_alpha: Beta parameters (0: that mix off).
        mix_prob: probability of mixing a batch.
        switch_prob: with both on, probability of CutMix rather than mixup.
        label_smoothing: smoothing of the (mixed) one-hot targets.
    """

    def __init__(self, num_classes, resize=0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0,
                 switch_prob=0.5, label_smoothing=0.0):
        from timm.data import Mixup
        self.num_classes = num_classes
        self.resize = resize
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob,
                               switch_prob=switch_prob, mode="batch",
                               label_smoothing=label_smoothing, num_classes=num_classes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return cls(num_classes, resize=cfg.DATASET.RESIZE, mixup_alpha=cfg.DATASET.MIXUP.ALPHA,
                   cutmix_alpha=cfg.DATASET.CUTMIX.ALPHA, mix_prob=cfg.DATASET.MIXUP.PROB,
                   switch_prob=cfg.DATASET.MIXUP.SWITCH_PROB,
                   label_smoothing=cfg.SOLVER.LABEL_SMOOTHING)

    @property
    def soft_targets(self):
        """Whether the task loss's targets become class probabilities."""
        return self.mixup is not None or self.label_smoothing > 0

    @property
    def active(self):
        return self.soft_targets or self.resize > 0

    def test_transform(self, forward):
        """``forward`` of the evaluation, seeing images as the training did (resized)."""
        if not self.resize:
            return forward
        return lambda image: forward(resize_images(image, self.resize))

    def __call__(self, batch):
        """A new batch with the images transformed and ``target`` soft ([B, classes]
        float) when mixing or smoothing; ``batch`` itself is left as it was."""
        batch = dict(batch)
        image, target = batch["image"], batch["target"]
        if self.resize:
            image = resize_images(image, self.resize)
        if self.mixup is not None:
            # timm mixes in place: work on a copy so the loader's tensor stays whole.
            image = image.clone()
            even = image.shape[0] - image.shape[0] % 2
            _, soft = self.mixup(image[:even], target[:even])
            if even < image.shape[0]:
                soft = torch.cat([soft, self.smoothed(target[even:])])
            target = soft
        elif self.label_smoothing > 0:
            target = self.smoothed(target)
        batch["image"], batch["target"] = image, target
        return batch

    def smoothed(self, target):
        """The one-hot targets smoothed as timm's ``mixup_target`` with weight 1."""
        from timm.data.mixup import mixup_target
        return mixup_target(target, self.num_classes, lam=1.0, smoothing=self.label_smoothing)


def build_ema(solver, student):
    """timm's ``ModelEmaV3`` of ``student`` (SOLVER.EMA), or None when off.

    The trainer updates it with the global step count after each accepted
    step (``ema.update(student, step)``): its first update copies the student,
    then ``ema = decay * ema + (1 - decay) * student`` over parameters and
    floating buffers (BatchNorm's statistics), integer buffers copied.
    """
    if not solver.EMA.ENABLE:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(student, decay=solver.EMA.DECAY, use_warmup=solver.EMA.WARMUP)
