"""ImageNet models; importing this package registers them in ``IMAGENET_MODELS``."""
from . import mobilenetv1, resnet  # noqa: F401
from .resnet import torchvision_weights  # noqa: F401
