"""Model zoo. ``build_model(name, num_classes, dataset)``; forward returns ``(logits, feats)``."""
from ..registry import CIFAR_MODELS, IMAGENET_MODELS
from . import cifar, imagenet  # noqa: F401  (registration)
from .imagenet import torchvision_weights

__all__ = ["build_model", "model_names", "torchvision_weights"]


def _registry(dataset):
    return IMAGENET_MODELS if dataset == "imagenet" else CIFAR_MODELS


def build_model(name, num_classes, dataset="cifar100"):
    """Build model ``name`` of the family ``dataset`` uses (ImageNet or 32x32 images).

    Raises:
        UserError: unknown name (the valid ones are listed, closest first).
    """
    return _registry(dataset).get(name)(num_classes=num_classes)


def model_names(dataset="cifar100"):
    """Names of the models available for ``dataset``."""
    return _registry(dataset).names()
