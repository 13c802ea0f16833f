"""CIFAR-sized (32x32) models; importing this package registers them."""
from . import mobilenetv2, resnet, resnetv2, shufflenet, vgg, wrn  # noqa: F401
