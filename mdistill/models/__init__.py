"""The model zoo. Importing this package registers every model.

Every model's ``forward(x)`` returns ``(logits, feats)`` where ``feats`` is a
dict: ``"feats"`` (feature maps, placed as in mdistiller: the stem first where
the class declares ``stem_map``, then one per stage), ``"preact_feats"`` (the
same positions before the stage's last ReLU; zoo models only) and
``"pooled_feat"`` (the vector the classifier reads). Each family's module
docstring lists its maps and their shapes. :mod:`.stages` says what a model
really gives (:func:`provided_outputs`), what each map is (:func:`stage_info`)
and which maps of two models pair (:func:`pair_stages`).

Example::

    model = build_model("resnet8x4", num_classes=100)
    logits, feats = model(images)          # images: [N, 3, 32, 32]
    feats["feats"][2].shape                # [N, 128, 16, 16]
"""
from ..registry import CIFAR_MODELS, IMAGENET_MODELS
from . import cifar, imagenet  # noqa: F401  (registration)
from .external import build_external, is_external
from .imagenet import torchvision_weights
from .stages import (MODEL_OUTPUTS, StageInfo, model_name, pair_model_stages, pair_stages,
                     probe_outputs, provided_outputs, stage_info)

__all__ = ["MODEL_OUTPUTS", "StageInfo", "build_model", "is_external", "model_name",
           "model_names", "pair_model_stages", "pair_stages", "probe_outputs", "provided_outputs",
           "stage_info",
           "torchvision_weights"]


def _registry(dataset):
    # Every dataset but ImageNet (cifar100, digits, synthetic) has 32x32 images.
    return IMAGENET_MODELS if dataset == "imagenet" else CIFAR_MODELS


def build_model(name, num_classes, dataset="cifar100", **options):
    """Build a freshly initialised model.

    Args:
        name: a registered name, e.g. ``"resnet32x4"`` or ``"wrn_40_2"``, or
            ``"torchvision:<name>"`` / ``"timm:<name>"`` (see :mod:`.external`).
        num_classes: classifier outputs.
        dataset: ``"imagenet"`` selects the ImageNet family; any other dataset
            the 32x32 (CIFAR) family.
        **options: for torchvision and timm models only (the zoo ignores them):
            ``image_size``, ``small_input``, ``pretrained``.

    Returns:
        An ``nn.Module`` whose ``forward`` returns ``(logits, feats)``; its
        ``name`` attribute is ``name``.

    Raises:
        UserError: unknown name (the valid ones are listed, sorted).
    """
    if is_external(name):
        return build_external(name, num_classes, **options)
    model = _registry(dataset).get(name)(num_classes=num_classes)
    model.name = name       # for messages that name the model (not in the state dict)
    return model


def model_names(dataset="cifar100"):
    """The sorted names :func:`build_model` accepts for ``dataset``."""
    return _registry(dataset).names()
