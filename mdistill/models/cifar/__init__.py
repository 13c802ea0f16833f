"""Models for 32x32 images (CIFAR-100, digits, synthetic); importing this
package registers them in ``CIFAR_MODELS``."""
from . import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
