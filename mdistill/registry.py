"""One Registry class; MODELS, DATASETS, DISTILLERS and others are instances."""
from .errors import unknown_choice


class Registry:
    """A name -> object table filled by a decorator.

    Example::

        MODELS = Registry("model")

        @MODELS.register()
        def resnet8(num_classes=100):
            ...

        MODELS.get("resnet8")(num_classes=10)

    Registering a name twice raises; looking up a missing name raises a
    :class:`~mdistill.errors.UserError` suggesting the closest name and listing
    every valid name, sorted.
    """

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name=None, obj=None):
        """Register ``obj`` under ``name`` (its ``__name__`` when None).

        Used as ``@REG.register()``, ``@REG.register("NAME")`` or
        ``REG.register("NAME", obj)``.
        """
        if obj is not None:
            self._add(name or obj.__name__, obj)
            return obj

        def decorator(target):
            self._add(name or target.__name__, target)
            return target

        return decorator

    def _add(self, name, obj):
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name):
        """Return the object registered as ``name``."""
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_choice(self.kind, name, self._entries) from None

    def names(self):
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self._entries)

    def __repr__(self):
        return f"Registry({self.kind!r}, {self.names()})"


CIFAR_MODELS = Registry("CIFAR model")
IMAGENET_MODELS = Registry("ImageNet model")
DATASETS = Registry("dataset")
DISTILLERS = Registry("distiller")
