"""SDD: Wei et al., "Scale Decoupled Distillation" (CVPR 2024), a switch on KD, DKD
and NKD; and the helpers that apply a model's own classifier to its last map
(SDD's local logits, CAT-KD's class activation maps).

Facts from the authors' code (shicaiwei123/SDD-CVPR2024, an mdistiller fork:
``mdistiller/models/cifar/utils.py`` ``SPP``, ``mdistiller/distillers/KD.py``
``sdd_kd_loss``, ``SDD_DKD.py``, ``SDD_nkd.py``, the ``teacher_*.sh`` scripts):

* the map the model pools into its classifier's input is average-pooled to
  ``M x M`` cells for each scale M of ``--M`` (``[1,2]`` for teacher and student
  of one family, ``[1,2,4]`` across families), the 1x1 (global) region first,
  then each scale's cells in row-major order; every cell goes through the
  model's own classifier, giving local logits;
* the method's loss (KD, DKD or NKD) is computed on every region of every
  sample, per row, and averaged over all ``regions x batch`` rows after
  weighting: a local region whose teacher prediction is right while the
  global one is wrong, or wrong while the global one is right (a
  complementary region), weighs 2; the others (consistent) and the global
  region weigh 1;
* SD-DKD and SD-NKD keep their methods' warm-up (20 epochs); SD-KD has none.

How a model's classifier input is found is ours (the authors edit every
model): see :class:`MapClassifier`.
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError


def model_label(model):
    """The model's registered name for messages, else its class name."""
    return getattr(model, "name", None) or type(model).__name__


def find_classifier(model, width):
    """The name of the classifier: the last ``nn.Linear`` reading ``width`` features.

    Args:
        model: the model.
        width: the width of its ``pooled_feat``.

    Returns:
        The module's qualified name (for ``model.get_submodule``), or None.
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features == width:
            found = name
    return found


@torch.no_grad()
def probe_random(model, image_shape):
    """``model``'s outputs on a seeded random batch of 2, in eval mode.

    A random batch, not zeros: a fresh model (BatchNorm statistics 0 and 1,
    convolutions without bias) maps zeros to zeros everywhere, so zeros cannot
    tell which map the classifier reads. Eval mode leaves the BatchNorm
    statistics as they were; the model's mode is restored.
    """
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, *image_shape, generator=generator).to(device)
    model.eval()
    try:
        return model(image)
    finally:
        model.train(was_training)


def _close(value, reference):
    scale = reference.abs().max().item() + 1.0
    return value.shape == reference.shape and torch.allclose(
        value.float(), reference.float(), rtol=1e-4, atol=1e-5 * scale)


class MapClassifier:
    """Where a model's classifier reads from: the map it average-pools into
    ``pooled_feat``, and the linear layer it applies to that vector.

    The map is ``feats["feats"][-1]`` where the model pools its last stage map
    (ResNets, VGG, ShuffleNetV1, MobileNetV1), else ``relu(preact_feats[-1])``
    where a BN-ReLU follows the last stage (WRN); a model with a head
    convolution after its last stage map (the CIFAR MobileNetV2 and
    ShuffleNetV2) exposes neither and is refused. Built by :meth:`locate`,
    which checks on a probe that pooling the map and applying the linear layer
    gives the model's logits. A plain object holding names, not modules: the
    classifier stays the model's own (trained with it, saved with it).

    Args:
        source: ``"feats"`` or ``"preact_feats"``.
        classifier: the linear layer's qualified name in the model.
    """

    def __init__(self, source, classifier):
        self.source = source
        self.classifier = classifier

    @property
    def reads(self):
        """What this reads of the model's outputs."""
        return frozenset({self.source})

    @classmethod
    def locate(cls, model, image_shape, method):
        """Find the map and the classifier of ``model`` by probing it.

        Args:
            model: the model.
            image_shape: ``(C, H, W)`` of the training images.
            method: what needs it, for the error message (e.g. ``"SDD (SDD.ENABLE)"``).

        Raises:
            UserError: the model has no linear classifier on ``pooled_feat``, or
                no map it pools into ``pooled_feat`` is among its outputs.
        """
        logits, feats = probe_random(model, image_shape)
        pooled = feats["pooled_feat"]
        classifier = find_classifier(model, pooled.shape[1])
        name = model_label(model)
        if classifier is None or not _close(model.get_submodule(classifier)(pooled), logits):
            raise UserError(f"{method} applies the classifier to local features, but model "
                            f"{name} has no nn.Linear layer mapping its pooled_feat "
                            f"({pooled.shape[1]} wide) to its logits; use a zoo model whose "
                            f"classifier is one linear layer (fc, classifier, linear)")
        candidates = [("feats", feats["feats"][-1])]
        if feats.get("preact_feats"):
            candidates.append(("preact_feats", F.relu(feats["preact_feats"][-1])))
        for source, feature_map in candidates:
            if feature_map.dim() == 4 and _close(feature_map.mean(dim=(2, 3)), pooled):
                return cls(source, classifier)
        shape = tuple(feats["feats"][-1].shape[1:])
        raise UserError(f"{method} needs the map model {name} average-pools into its "
                        f"classifier's input ({pooled.shape[1]} wide), but its last feature map "
                        f"{shape} does not pool into it (a head convolution follows it in "
                        f"MobileNetV2 and ShuffleV2); use models whose last stage map is pooled "
                        f"directly (ResNets, WRN, VGG, ShuffleV1, MobileNetV1)")

    def feature_map(self, feats):
        """The map the classifier's input is pooled from, ``[B, C, H, W]``."""
        if self.source == "feats":
            return feats["feats"][-1]
        return F.relu(feats["preact_feats"][-1])

    def linear(self, model):
        """The classifier module of ``model``."""
        return model.get_submodule(self.classifier)


def pooled_regions(feature_map, scales):
    """Average-pool ``feature_map`` to an ``M x M`` grid for each scale M.

    Returns:
        ``[B, C, N]`` with ``N = sum(M^2)``: the scales in order, each grid's
        cells in row-major order (the 1x1 global region first when scales start at 1).
    """
    return torch.cat([F.adaptive_avg_pool2d(feature_map, scale).flatten(2) for scale in scales],
                     dim=2)


def region_logits(feature_map, linear, scales):
    """The classifier applied to every pooled region.

    Returns:
        ``[N * B, classes]``, row ``n * B + b`` for region n of sample b (the
        authors' order: all samples of region 0, then region 1, ...).
    """
    regions = pooled_regions(feature_map, scales)
    count, batch = regions.shape[2], regions.shape[0]
    return linear(regions.permute(2, 0, 1).reshape(count * batch, -1))


def region_weights(teacher_rows, target, complementary_weight):
    """SDD's weight of every region row.

    A local region is complementary when the teacher's prediction on it is
    right and its global prediction wrong, or the reverse; it weighs
    ``complementary_weight``, every other row (the global region included) 1.

    Args:
        teacher_rows: ``[N * B, classes]`` from :func:`region_logits`, global region first.
        target: ``[B]`` labels.
        complementary_weight: the weight of complementary regions (2 in the authors' code).

    Returns:
        ``[N * B]`` float weights.
    """
    batch = target.shape[0]
    correct = (teacher_rows.argmax(dim=1).view(-1, batch) == target.view(1, batch))
    complementary = correct != correct[:1]
    weights = torch.ones(correct.shape, dtype=torch.float32, device=teacher_rows.device)
    return weights.masked_fill(complementary, float(complementary_weight)).flatten()


class ScaleDecoupling:
    """SDD's multi-scale local logits of a student and a teacher, for a logit method
    that computes its loss per row (:meth:`KD.forward_train` and the others).

    Args:
        student, teacher: the models (probed once to find their maps and classifiers).
        scales: the grid sizes M, increasing and starting with 1 (the global region).
        complementary_weight: the weight of complementary regions.
        image_shape: ``(C, H, W)`` of the training images.

    Raises:
        UserError: bad scales, or a model whose classifier input cannot be found.
    """

    def __init__(self, student, teacher, scales=(1, 2), complementary_weight=2.0,
                 image_shape=(3, 32, 32)):
        given = list(scales)
        if (not given or any(not float(scale).is_integer() for scale in given)
                or given[0] != 1 or any(b <= a for a, b in zip(given, given[1:]))):
            raise UserError(f"SDD.SCALES must be increasing grid sizes starting with 1 (the "
                            f"global region), e.g. [1, 2] or [1, 2, 4]; got {given}")
        self.scales = [int(scale) for scale in given]
        self.complementary_weight = complementary_weight
        self.student_map = MapClassifier.locate(student, image_shape, "SDD (SDD.ENABLE)")
        self.teacher_map = MapClassifier.locate(teacher, image_shape, "SDD (SDD.ENABLE)")

    @property
    def teacher_reads(self):
        """What SDD reads of the teacher: the map alone (its global region gives the logits)."""
        return self.teacher_map.reads

    @property
    def student_reads(self):
        """What SDD reads of the student: its logits (for the cross-entropy) and the map."""
        return frozenset({"logits"}) | self.student_map.reads

    def rows(self, student, student_feats, teacher, teacher_feats, target):
        """The region logits of both models and the weight of each row.

        Returns:
            ``(student_rows, teacher_rows, target_rows, weights)``: ``[N * B, classes]``
            twice (the teacher's without autograd), the label of each row, ``[N * B]``.
        """
        student_rows = region_logits(self.student_map.feature_map(student_feats),
                                     self.student_map.linear(student), self.scales)
        with torch.no_grad():
            teacher_rows = region_logits(self.teacher_map.feature_map(teacher_feats),
                                         self.teacher_map.linear(teacher), self.scales)
        weights = region_weights(teacher_rows, target, self.complementary_weight)
        target_rows = target.repeat(student_rows.shape[0] // target.shape[0])
        return student_rows, teacher_rows, target_rows, weights


def scale_decoupling_from_config(cfg, student, teacher, data_info=None):
    """The :class:`ScaleDecoupling` SDD.* asks for, or None when SDD.ENABLE is off."""
    if not cfg.SDD.ENABLE:
        return None
    size = getattr(data_info, "image_size", 32)
    return ScaleDecoupling(student, teacher, scales=list(cfg.SDD.SCALES),
                           complementary_weight=cfg.SDD.COMPLEMENTARY_WEIGHT,
                           image_shape=(3, size, size))
