"""CIFAR-sized (32x32) models; importing this package registers them."""
from . import resnet, vgg, wrn  # noqa: F401
