"""torchvision and timm classifiers as teachers and students.

``build_model("torchvision:resnet50", 10)`` or ``build_model("timm:convnext_tiny", 10)``
returns a model with mdistill's contract: ``forward(x)`` gives ``(logits, feats)``
with ``feats = {"feats": [...], "pooled_feat": ...}``, so logit methods (KD,
DKD, ...) and feature methods (FitNet, AT, CRD, RKD, ...) pair it with any other
model.

``feats`` are the stage outputs, found per family:

* torchvision, through ``create_feature_extractor``: ResNet/ResNeXt/Wide-ResNet
  (the stem's ReLU, then ``layer1``-``layer4``), RegNet (stem, ``block1``-``block4``),
  ShuffleNet V2 (``conv1``, ``stage2``-``stage4``), the models built on a
  ``features`` sequence (VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet, ...:
  the last block at each spatial resolution) and the vision transformers (the
  patch embedding, then the tokens of four evenly spaced encoder blocks
  reshaped to maps, the class token left out);
* timm, through ``forward_intermediates`` (its stage outputs; for a vision
  transformer four evenly spaced blocks, tokens reshaped to maps by timm).

Whether ``feats[0]`` is a stem map (``stem_map``, see :mod:`.stages`) is
declared per family: the ResNet, RegNet and ShuffleNet V2 stems and a torchvision
transformer's patch embedding are; a timm vision transformer has no stem map;
for the other families the first map is the stem's when it lies at a nominal
stride below 4 (:data:`FIRST_STAGE_STRIDE`, the stride of a backbone's first
stage: ResNet's ``layer1``, timm's ``feature_info`` reductions).

There are no ``preact_feats``: the libraries expose their stage outputs after
the activation only, and a copy of them would train methods of pre-activation
maps (AB, ReviewKD's STU_PREACT, OFD) on a loss the model cannot reduce; reading
them raises an error naming the model. :meth:`ExternalClassifier.provided_outputs`
says what is there. ``pooled_feat`` is what the last linear layer reads. A model
of another family still trains with logit methods; a feature method then stops
with an error naming the model.

A timm model with a distillation token (``deit_*_distilled_*``) gives its class
head's logits as ``logits`` and its distillation head's as ``feats["dist_logits"]``
(DEIT trains the two and evaluates their mean, as timm's eval mode).

The network's parameters live under ``network.``; :meth:`ExternalClassifier.adapt_state_dict`
also accepts the library's own keys, so a checkpoint saved from a plain
torchvision or timm model loads as DISTILLER.TEACHER_WEIGHTS.
"""
import difflib
import math
import os

import torch
from torch import nn

from ..errors import UserError, unknown_choice
from .common import global_pool

PREFIXES = ("torchvision:", "timm:")
#: Encoder blocks of a vision transformer whose tokens become ``feats``.
VIT_STAGES = 4
#: The nominal stride of a backbone's first stage (ResNet's layer1, FPN's C2,
#: timm's feature_info): a first map finer than this is the stem's.
FIRST_STAGE_STRIDE = 4


def is_external(name):
    """Whether ``name`` is a ``torchvision:<name>`` or ``timm:<name>`` model."""
    return str(name).startswith(PREFIXES)


def build_external(name, num_classes, image_size=32, small_input=False, pretrained=False):
    """Build a torchvision or timm classifier wrapped in mdistill's contract.

    Args:
        name: ``torchvision:<architecture>`` or ``timm:<architecture>``.
        num_classes: classifier outputs.
        image_size: the input side (vision transformers are built for it;
            feature stages are probed at it).
        small_input: adapt the stem to small (32 px) inputs: the first
            convolution at stride 1 and the stem's max-pool removed.
        pretrained: load the library's pretrained weights (all but a
            classifier of another size), from its cache or downloaded.

    Raises:
        UserError: an unknown architecture (the closest names listed), timm not
            installed, or pretrained weights that are neither cached nor downloadable.
    """
    library, arch = name.split(":", 1)
    if library == "torchvision":
        return TorchvisionClassifier(arch, num_classes, image_size, small_input, pretrained)
    return TimmClassifier(arch, num_classes, image_size, small_input, pretrained)


class ExternalFeats(dict):
    """The ``feats`` of a library model: what it really gives. Asking for
    anything else (``preact_feats``; ``feats`` of a family whose stages are
    unknown) raises a UserError naming the model and saying why.

    Args:
        name: the model's name.
        **outputs: ``feats`` when the stages are known, ``pooled_feat``.
    """

    def __init__(self, name, **outputs):
        super().__init__(**outputs)
        self.name = name

    def __missing__(self, key):
        if key == "preact_feats":
            raise UserError(f"{self.name} gives no pre-activation maps ('preact_feats'): "
                            f"torchvision and timm expose stage outputs after their "
                            f"activation only; use a method that reads 'feats', or a zoo model")
        if key == "feats":
            raise UserError(f"{self.name} gives no stage feature maps ('feats'), which this "
                            f"method needs: use a logit method (KD, ...) or a model of a "
                            f"supported family (see mdistill/models/external.py)")
        if key == "pooled_feat":
            raise UserError(f"{self.name} gives no pooled feature ('pooled_feat'): its "
                            f"classifier is not a last linear layer; use a logit method (KD, ...)")
        raise KeyError(key)


# A pytree node, not a leaf, so DistributedDataParallel and torch.compile reach the
# tensors inside as they do a plain dict's.
torch.utils._pytree.register_pytree_node(
    ExternalFeats,
    lambda feats: (list(feats.values()), (feats.name, tuple(feats))),
    lambda values, context: ExternalFeats(context[0], **dict(zip(context[1], values))),
    serialized_type_name="mdistill.models.external.ExternalFeats")


class ExternalClassifier(nn.Module):
    """A library classifier (``self.network``) behind mdistill's forward contract."""

    #: Whether ``feats[0]`` is the stem's map; set per family at construction.
    stem_map = True
    #: Whether the maps are a transformer's tokens, all at one stride (ViT), rather
    #: than a pyramid (CNN, Swin); OFA builds its projectors for what they are.
    token_maps = False
    #: Whether the model has a distillation token and head (timm's ``deit_*_distilled_*``):
    #: its ``feats["dist_logits"]`` are that head's logits, ``logits`` the class head's.
    has_dist_head = False

    def __init__(self, name, network):
        super().__init__()
        self.name = name
        self.network = network
        self.has_stages = False
        self.has_pooled = True

    def provided_outputs(self):
        """What the model really gives (see :func:`mdistill.models.provided_outputs`):
        ``logits``, ``pooled_feat``, ``feats`` when its stages are known and
        ``dist_logits`` when it has a distillation token."""
        return frozenset({"logits"} | ({"pooled_feat"} if self.has_pooled else set())
                         | ({"dist_logits"} if self.has_dist_head else set())
                         | ({"feats"} if self.has_stages else set()))

    def adapt_state_dict(self, state):
        """Accept the library's own keys (without ``network.``) as well as ours."""
        if state and not any(key.startswith("network.") for key in state):
            return {f"network.{key}": value for key, value in state.items()}
        return state

    def extra_repr(self):
        return self.name


# -------------------------------------------------------------- torchvision
class TorchvisionClassifier(ExternalClassifier):
    """A ``torchvision.models`` classifier; stages through ``create_feature_extractor``."""

    def __init__(self, arch, num_classes, image_size=32, small_input=False, pretrained=False):
        import torchvision
        from torchvision.models.feature_extraction import get_graph_node_names
        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise unknown_choice("torchvision model", arch, known)
        options = {}
        if arch.startswith("vit_"):
            options["image_size"] = image_size            # built for the input size
        if arch in ("googlenet", "inception_v3"):
            options.update(aux_logits=False, init_weights=True)   # one output
        network = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                               **options)
        if pretrained:
            _load_pretrained_torchvision(network, arch)
        removed = 1
        if small_input and "image_size" not in options:
            removed = adapt_stem(network)
        super().__init__(f"torchvision:{arch}", network)
        nodes = get_graph_node_names(network)[1]
        self.stage_nodes, self.token_stages, self.stem_map = _torchvision_stages(
            network, nodes, image_size, removed)
        self.has_stages = bool(self.stage_nodes)
        self.token_maps = bool(self.token_stages)
        self.logits_node = nodes[-1]
        linear = _last_linear_name(network)
        self.pooled_node = nodes[-2] if linear is not None and nodes[-1] == linear else None
        # Without a last linear layer, the last map pooled stands for its input.
        self.has_pooled = self.pooled_node is not None or self.has_stages
        self.returned = {node: node for node in self.stage_nodes}
        self.returned[self.logits_node] = self.logits_node
        if self.pooled_node is not None:
            self.returned[self.pooled_node] = self.pooled_node

    def extractor(self):
        """The traced network that returns the stage, pooled and logit nodes.

        It calls the network's own modules (so it shares their parameters) and
        is kept out of the module tree, so the state dict holds each weight once.
        """
        from torchvision.models.feature_extraction import create_feature_extractor
        built = self.__dict__.get("_extractor")
        if built is None:
            modules = tuple(map(id, self.network.modules()))
            built = modules, create_feature_extractor(self.network, return_nodes=self.returned)
            self.__dict__["_extractor"] = built
        return built[1]

    def train(self, mode=True):
        """Also trace again when a module of the network was replaced since the
        trace (SyncBatchNorm's conversion does), which the trace would not follow."""
        built = self.__dict__.get("_extractor")
        if built is not None and built[0] != tuple(map(id, self.network.modules())):
            del self.__dict__["_extractor"]
        return super().train(mode)

    def forward(self, x):
        extractor = self.extractor()
        if extractor.training != self.training:
            extractor.train(self.training)
        outputs = extractor(x)
        maps = [_tokens_to_map(outputs[node]) if node in self.token_stages else outputs[node]
                for node in self.stage_nodes]
        logits = outputs[self.logits_node]
        given = {"feats": maps} if maps else {}
        if self.pooled_node is not None:
            given["pooled_feat"] = outputs[self.pooled_node].flatten(1)
        elif maps:
            given["pooled_feat"] = global_pool(maps[-1])
        return logits, ExternalFeats(self.name, **given)


def _torchvision_stages(network, nodes, image_size, removed=1):
    """``(stage node names, the ones holding tokens, whether the first is the stem's)``
    for a torchvision network; ``removed``: the stride :func:`adapt_stem` took out."""
    names = set(dict(network.named_modules()))
    if {"layer4", "relu", "conv1"} <= names:                       # ResNet family
        return ["relu", "layer1", "layer2", "layer3", "layer4"], set(), True
    if "trunk_output" in names:                                    # RegNet
        return ["stem"] + [f"trunk_output.block{index}" for index in range(1, 5)], set(), True
    if "stage2" in names and "conv1" in names:                     # ShuffleNet V2
        return ["conv1", "stage2", "stage3", "stage4"], set(), True
    if "conv_proj" in names and "encoder.layers" in names:         # vision transformer
        depth = len(network.encoder.layers)
        blocks = [f"encoder.layers.encoder_layer_{index}"
                  for index in _evenly_spaced(depth, VIT_STAGES)]
        return ["conv_proj"] + blocks, set(blocks), True           # the patch embedding
    for container in ("features", "layers"):
        sequence = getattr(network, container, None)
        if isinstance(sequence, nn.Sequential) and any(node.startswith(f"{container}.")
                                                       for node in nodes):
            stages, first_stride = _last_block_per_resolution(network, container, image_size)
            return stages, set(), first_stride * removed < FIRST_STAGE_STRIDE
    return [], set(), True


def _evenly_spaced(depth, count):
    """``count`` block indices spread over ``depth`` blocks, the last one included."""
    count = min(count, depth)
    return sorted({math.ceil(depth * (index + 1) / count) - 1 for index in range(count)})


@torch.no_grad()
def _last_block_per_resolution(network, container, image_size):
    """Children of ``network.<container>`` that end a spatial resolution, and
    the first one's stride (the input side over its map's)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    children = [f"{container}.{name}" for name, _ in getattr(network, container).named_children()]
    probe = create_feature_extractor(network, return_nodes={name: name for name in children})
    was_training = network.training
    probe.eval()
    try:
        outputs = probe(torch.zeros(2, 3, image_size, image_size))
    finally:
        network.train(was_training)
    stages = []
    for index, name in enumerate(children):
        output = outputs[name]
        if output.dim() != 4:
            continue
        following = outputs[children[index + 1]] if index + 1 < len(children) else None
        if following is None or following.dim() != 4 or following.shape[2:] != output.shape[2:]:
            stages.append(name)
    first_stride = image_size / outputs[stages[0]].shape[2] if stages else 1
    return stages, first_stride


def _tokens_to_map(tokens):
    """``[N, 1 + h*w, D]`` transformer tokens -> ``[N, D, h, w]``, the class token dropped."""
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _last_linear_name(network):
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _load_pretrained_torchvision(network, arch):
    import torchvision
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as error:  # noqa: BLE001  (no network: URLError, OSError, ...)
        raise UserError(f"torchvision's pretrained weights for {arch} are not in the local "
                        f"cache ({cached}) and could not be downloaded ({error}); copy "
                        f"{os.path.basename(weights.url)} there, or set DISTILLER.TEACHER_WEIGHTS "
                        f"to a checkpoint") from None
    load_except_classifier(network, state, f"torchvision:{arch}")


def load_except_classifier(network, state, name):
    """Load pretrained ``state`` into ``network``; only the last linear layer may
    differ in shape (a new classifier for another number of classes)."""
    own = network.state_dict()
    classifier = _last_linear_name(network)
    mismatched = [key for key, value in state.items()
                  if key in own and tuple(value.shape) != tuple(own[key].shape)]
    missing = [key for key in own if key not in state]
    bad = [key for key in mismatched + missing
           if classifier is None or not key.startswith(f"{classifier}.")]
    if bad:
        key = bad[0]
        shape = tuple(state[key].shape) if key in state else "absent"
        raise UserError(f"pretrained weights of {name} do not fit the model built here: "
                        f"{key} is {shape} in the weights, {tuple(own[key].shape)} in the "
                        f"model (was the input size changed?)")
    network.load_state_dict({key: value for key, value in state.items()
                             if key in own and key not in mismatched}, strict=False)


def adapt_stem(network):
    """Adapt a network to 32 px inputs in place: its first convolution strides
    by 1 (the kernel and its weights kept) and a max-pool before the second
    convolution (the stem's) becomes an identity.

    Returns:
        The factor by which every later map's stride shrank (4 for a ResNet:
        the convolution's 2 times the max-pool's 2).
    """
    convolutions, removed = 0, 1
    for name, module in list(network.named_modules()):
        if isinstance(module, nn.Conv2d):
            convolutions += 1
            if convolutions == 1:
                removed *= module.stride[0]
                if module.kernel_size == module.stride and module.padding == (0, 0) \
                        and module.stride[0] > 1:
                    # A patchify stem (ConvNeXt's 4x4 at stride 4) at stride 1 would
                    # shrink every map by 3 pixels: pad it to keep the input's size.
                    _replace(network, name, _same_padded(module))
                else:
                    module.stride = (1, 1)
            else:
                return removed
        elif isinstance(module, nn.MaxPool2d) and convolutions == 1:
            stride = module.stride if isinstance(module.stride, int) else module.stride[0]
            removed *= stride
            _replace(network, name, nn.Identity())
    return removed


def _replace(network, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, module)


def _same_padded(conv):
    """``conv`` at stride 1 with "same" padding, its weights kept."""
    padded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1,
                       padding="same", groups=conv.groups, bias=conv.bias is not None)
    padded.load_state_dict(conv.state_dict())
    return padded


# --------------------------------------------------------------------- timm
class TimmClassifier(ExternalClassifier):
    """A timm classifier; stages through ``forward_intermediates``."""

    def __init__(self, arch, num_classes, image_size=32, small_input=False, pretrained=False):
        try:
            import timm
        except ImportError:
            raise UserError(f"timm:{arch} needs timm: pip install -e \".[timm]\" "
                            f"(or pip install timm)") from None
        known = timm.list_models()
        if arch not in known and arch.split(".")[0] not in known:
            close = difflib.get_close_matches(arch, known, n=5)
            raise UserError(f"unknown timm model {arch!r}; closest: {', '.join(close) or 'none'} "
                            f"(timm.list_models() lists all {len(known)})")
        options = {"num_classes": num_classes}
        probe = timm.create_model(arch, pretrained=False, **options)
        transformer = hasattr(probe, "patch_embed") and hasattr(probe, "blocks")
        # Patch-embedded models (ViT, DeiT, Swin) are built for the input size;
        # their patch grid then fits it and the stem is left as it is.
        patch_embedded = getattr(getattr(probe, "patch_embed", None), "img_size", None) is not None
        if patch_embedded and tuple(probe.patch_embed.img_size) != (image_size,) * 2:
            options["img_size"] = image_size
        if pretrained:
            try:
                network = timm.create_model(arch, pretrained=True, **options)
            except Exception as error:  # noqa: BLE001  (hub errors come in many kinds)
                raise UserError(f"timm's pretrained weights for {arch} are not in the local "
                                f"cache and could not be downloaded ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}); set "
                                f"DISTILLER.TEACHER_WEIGHTS to a checkpoint instead") from None
        else:
            network = timm.create_model(arch, **options) if "img_size" in options else probe
        if small_input and not patch_embedded:
            adapt_stem(network)
        super().__init__(f"timm:{arch}", network)
        self.token_maps = transformer
        self.has_dist_head = isinstance(getattr(network, "head_dist", None), nn.Module)
        # With a distillation token: whether training returns the class head's logits
        # (the method trains the distillation head itself, DeiT) or, as timm's
        # default, the mean of the two heads (both learn the labels).
        self.distilled_training = False
        self.indices = (_evenly_spaced(len(network.blocks), VIT_STAGES) if transformer
                        else None)
        self.has_stages = callable(getattr(network, "forward_intermediates", None))
        # A transformer's maps are blocks' tokens; a CNN's first map is its stem's
        # when timm's nominal reduction for it (unchanged by adapt_stem) is below 4.
        self.stem_map = not transformer and _first_reduction(network) < FIRST_STAGE_STRIDE

    def forward(self, x):
        network = self.network
        if self.has_stages:
            final, maps = network.forward_intermediates(x, indices=self.indices)
        else:
            final, maps = network.forward_features(x), []
        given = {"feats": list(maps)} if maps else {}
        if self.has_dist_head:
            logits, pooled, given["dist_logits"], distillation_token = self._two_heads(final)
            if not (self.training and self.distilled_training):
                # As timm's eval mode (and DeiT's test): the mean of the two heads, so
                # every evaluation (tools/eval.py, the weight average's) agrees; in
                # training too unless the method trains the distillation head.
                logits = (logits + given["dist_logits"]) / 2
                pooled = (pooled + distillation_token) / 2
        else:
            logits, pooled = self._head(final)
        return logits, ExternalFeats(self.name, pooled_feat=pooled, **given)

    def set_distilled_training(self, enable=True):
        """Train on the class head's logits and leave the distillation head to the
        method (timm's ``set_distilled_training``); off, training reads the mean of
        the two heads. A model without a distillation token ignores it."""
        self.distilled_training = bool(enable)

    def _two_heads(self, final):
        """``(class-head logits, its input, distillation-head logits, its input)``
        of a model with a distillation token: tokens 0 and 1 through their own
        heads, as timm's distilled training mode returns them."""
        network = self.network
        class_token = network.head_drop(final[:, 0])
        distillation_token = network.head_drop(final[:, 1])
        return (network.head(class_token), class_token,
                network.head_dist(distillation_token), distillation_token)

    def _head(self, final):
        """``(logits, the classifier's input)`` from one call of the head, so the
        pooled feature is exactly what the logits were computed from (the same
        dropout mask in training)."""
        network = self.network
        classifier = network.get_classifier()
        if not isinstance(classifier, nn.Module):
            # Several heads (a distillation token's), no single classifier input:
            # the head's own pre-logits, from a second call.
            return (network.forward_head(final),
                    network.forward_head(final, pre_logits=True).flatten(1))
        inputs = []
        handle = classifier.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        try:
            logits = network.forward_head(final)
        finally:
            handle.remove()
        return logits, inputs[-1].flatten(1)


def _first_reduction(network):
    """timm's nominal stride of the model's first stage output (1 when unknown,
    so the first map counts as the stem's, as the zoo's contract puts it first)."""
    try:
        return network.feature_info[0]["reduction"]
    except (AttributeError, IndexError, KeyError, TypeError):
        return 1
