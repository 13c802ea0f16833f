"""What a model's outputs really are, and which stages of two models pair.

A model declares what it is; methods that compare two models' stage maps
(AT, NST, VID, KDSVD) pair them from these declarations, not by position in
``feats["feats"]``:

* :func:`provided_outputs`: which of :data:`MODEL_OUTPUTS` a model really gives
  (a library model has no pre-activation maps, so it does not claim them);
* :func:`stage_info`: one :class:`StageInfo` per map of ``feats["feats"]``:
  its stride (probed), whether it is the stem's map (declared by the model
  class as ``stem_map``: True when ``feats[0]`` is a stem map) and its width;
* :func:`pair_stages`: stems never pair; the other stages pair from the
  deepest backwards, the last with the last, as many as the shorter list has.

Pairing from the deepest keeps mdistiller's ``feats[1:]`` position pairing for
every published CIFAR pair (their stage counts agree) and fixes the pairs whose
counts differ: ResNet50 -> MobileNetV1 on ImageNet (MobileNetV1's ``feats``
have no stem map, ResNet50's do) and timm vision transformers (no stem map)
with the zoo.

Example::

    student_info = stage_info(student, 224)     # MobileNetV1: strides 4, 8, 16, 32
    teacher_info = stage_info(teacher, 224)     # ResNet50: stem 2, then 4, 8, 16, 32
    pair_stages(student_info, teacher_info, "MobileNetV1", "ResNet50")
    # [(0, 1), (1, 2), (2, 3), (3, 4)]: equal strides, equal map sizes
"""
from typing import NamedTuple, Union

import torch

from ..errors import UserError

#: What a model's outputs may hold: ``logits``, the stage maps ``feats``, their
#: pre-activation versions ``preact_feats``, the classifier's input
#: ``pooled_feat``, and ``bn_stats`` (the BatchNorm before each pre-activation
#: map, from ``bn_before_relu()``, whose statistics OFD reads).
MODEL_OUTPUTS = frozenset({"logits", "feats", "preact_feats", "pooled_feat", "bn_stats"})


class StageInfo(NamedTuple):
    """What one map of ``feats["feats"]`` is.

    Args:
        stride: the input's height divided by the map's (an int when it divides;
            2, 4, ... for a CNN at 224 px).
        stem: whether the map is the stem's output (never paired).
        channels: the map's width.
    """
    stride: Union[int, float]
    stem: bool
    channels: int


def unwrapped(model):
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_name(model):
    """The name the model was built under (``resnet8x4``, ``timm:vit_tiny_patch16_224``),
    or its class name for a model not built by :func:`~mdistill.models.build_model`."""
    model = unwrapped(model)
    return getattr(model, "name", None) or type(model).__name__


def provided_outputs(model):
    """The outputs ``model`` really gives, a subset of :data:`MODEL_OUTPUTS`.

    A model may declare them as ``provided_outputs()`` (the torchvision and timm
    wrappers do: ``logits``, ``pooled_feat`` and, when their stages are known,
    ``feats``; never ``preact_feats`` nor ``bn_stats``). Any other model follows
    the zoo's contract (``logits``, ``feats``, ``preact_feats``, ``pooled_feat``)
    and gives ``bn_stats`` when it defines ``bn_before_relu()``.

    Args:
        model: a model, possibly compiled or wrapped in DDP.

    Returns:
        A frozenset of output names.
    """
    model = unwrapped(model)
    declared = getattr(model, "provided_outputs", None)
    if callable(declared):
        return frozenset(declared())
    outputs = {"logits", "feats", "preact_feats", "pooled_feat"}
    if callable(getattr(model, "bn_before_relu", None)):
        outputs.add("bn_stats")
    return frozenset(outputs)


def _image_shape(image_size):
    if isinstance(image_size, int):
        return (3, image_size, image_size)
    if len(image_size) == 2:
        return (3, *image_size)
    return tuple(image_size)


@torch.no_grad()
def probe_outputs(model, image_shape, device=None):
    """Run ``model`` once on zeros in eval mode to learn its output shapes.

    The model's train/eval mode and BN statistics are left as they were
    (mdistiller probed in train mode, which moved the teacher's BN statistics).

    Args:
        image_shape: ``(channels, height, width)`` of the inputs.
        device: where to put the zeros (default: the model's first parameter's).

    Returns:
        ``(logits, feats)`` for a batch of 2.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = device or (param.device if param is not None else "cpu")
        return model(torch.zeros(2, *image_shape, device=device))
    finally:
        model.train(was_training)


def stage_info(model, image_size, feats=None):
    """One :class:`StageInfo` per map of the model's ``feats["feats"]``.

    The strides come from the maps' sizes at ``image_size``; whether ``feats[0]``
    is a stem map is the model class's declaration ``stem_map`` (True for a model
    that does not declare it, as the zoo's contract puts the stem first).

    Args:
        model: the model (possibly compiled or wrapped in DDP).
        image_size: the input side, ``(height, width)`` or ``(channels, height, width)``.
        feats: the model's ``feats`` at that size, when already probed (e.g. by
            :meth:`~mdistill.distillers.base.Distiller.probe`); else the model is
            run once on zeros in eval mode.

    Returns:
        A list of :class:`StageInfo`, in the order of ``feats["feats"]``.

    Raises:
        UserError: the model gives no stage maps (a library model of an unknown family).
    """
    image_shape = _image_shape(image_size)
    if feats is None:
        feats = probe_outputs(model, image_shape)[1]
    stem_first = bool(getattr(unwrapped(model), "stem_map", True))
    infos = []
    for index, feature in enumerate(feats["feats"]):
        stride = image_shape[1] / feature.shape[2]
        infos.append(StageInfo(int(stride) if stride.is_integer() else stride,
                               stem_first and index == 0, int(feature.shape[1])))
    return infos


def pair_stages(student_info, teacher_info, student_name="student", teacher_name="teacher"):
    """Which student map pairs with which teacher map.

    Stems never pair; the other stages pair from the deepest backwards (the
    last with the last), as many pairs as the shorter list has stages.

    Args:
        student_info, teacher_info: lists of :class:`StageInfo` (:func:`stage_info`).
        student_name, teacher_name: the models' names, for the error.

    Returns:
        ``[(student index, teacher index), ...]`` into ``feats["feats"]``, from
        the shallowest pair to the deepest.

    Raises:
        UserError: a model has no stage map besides its stem.
    """
    sides = []
    for name, infos in ((student_name, student_info), (teacher_name, teacher_info)):
        stages = [index for index, info in enumerate(infos) if not info.stem]
        if not stages:
            raise UserError(f"{name} has no feature stage to pair besides its stem "
                            f"({len(infos)} map(s) in feats['feats']); a method that pairs "
                            f"stages needs at least one on each side")
        sides.append(stages)
    count = min(map(len, sides))
    return list(zip(sides[0][-count:], sides[1][-count:]))


def pair_model_stages(student, teacher, image_size, student_feats=None, teacher_feats=None):
    """:func:`pair_stages` of two models, from :func:`stage_info` at ``image_size``.

    Args:
        student, teacher: the models.
        image_size: as for :func:`stage_info`.
        student_feats, teacher_feats: their ``feats`` at that size, when already probed.

    Returns:
        ``[(student index, teacher index), ...]``, shallowest first.
    """
    return pair_stages(stage_info(student, image_size, student_feats),
                       stage_info(teacher, image_size, teacher_feats),
                       model_name(student), model_name(teacher))
