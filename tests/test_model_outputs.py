"""What each model really gives (provided_outputs), what its maps are
(stage_info), and the timm head called once (mdistill/models)."""
import importlib.util

import pytest
import torch

from mdistill.errors import UserError
from mdistill.models import (MODEL_OUTPUTS, build_model, model_name, model_names,
                             provided_outputs, stage_info)
from mdistill.models.external import ExternalFeats
from test_distiller_losses import one_thread  # noqa: F401  (autouse: one thread)

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="timm is an optional extra, not installed here")
LIBRARY_OUTPUTS = frozenset({"logits", "feats", "pooled_feat"})


# -------------------------------------------------------------------- zoo

@pytest.mark.parametrize("dataset, name", [("cifar100", name) for name in model_names()]
                         + [("imagenet", name) for name in model_names("imagenet")])
def test_zoo_models_give_all_five_outputs_and_declare_their_stem(dataset, name):
    model = build_model(name, 10, dataset=dataset)
    assert provided_outputs(model) == MODEL_OUTPUTS
    assert model_name(model) == name
    # Declared by the class itself, not left to a default.
    assert any("stem_map" in vars(cls) for cls in type(model).__mro__[:-1])
    assert type(model).stem_map is (name != "MobileNetV1")


def test_zoo_stage_strides_are_probed():
    assert stage_info(build_model("resnet8x4", 10), 32) == [
        (1, True, 32), (1, False, 64), (2, False, 128), (4, False, 256)]
    assert [(i.stride, i.stem) for i in stage_info(build_model("vgg8", 10), 32)] == [
        (1, True), (2, False), (4, False), (8, False), (8, False)]
    assert [(i.stride, i.stem) for i in stage_info(build_model("MobileNetV2", 10), 32)] == [
        (2, True), (2, False), (4, False), (8, False), (16, False)]


def test_compiled_models_keep_their_declarations():
    model = build_model("resnet8", 10)
    compiled = torch.compile(model)                      # lazy: nothing is compiled here
    assert provided_outputs(compiled) == MODEL_OUTPUTS and model_name(compiled) == "resnet8"


def test_a_model_without_bn_before_relu_gives_no_bn_stats():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x, {}
    assert provided_outputs(Plain()) == MODEL_OUTPUTS - {"bn_stats"}


# ------------------------------------------------------------ torchvision

def test_torchvision_models_give_no_preact_maps():
    model = build_model("torchvision:resnet18", 10, image_size=32, small_input=True).eval()
    assert provided_outputs(model) == LIBRARY_OUTPUTS
    _, feats = model(torch.zeros(2, 3, 32, 32))
    assert "preact_feats" not in feats
    with pytest.raises(UserError, match=r"^torchvision:resnet18 gives no pre-activation maps "
                                        r"\('preact_feats'\)"):
        feats["preact_feats"]


def test_a_torchvision_family_without_known_stages_gives_logits_and_pooled_only():
    model = build_model("torchvision:googlenet", 10, image_size=64).eval()
    assert provided_outputs(model) == {"logits", "pooled_feat"}
    _, feats = model(torch.zeros(2, 3, 64, 64))
    assert feats["pooled_feat"].shape == (2, 1024)
    with pytest.raises(UserError, match=r"^torchvision:googlenet gives no stage feature maps"):
        feats["feats"]


def test_library_feats_flatten_to_their_tensors_and_back():
    """DDP and torch.compile walk outputs as pytrees: the tensors inside must be
    reached, and the rebuilt dict must still refuse what the model lacks."""
    from torch.utils import _pytree
    maps, pooled = [torch.ones(1, 2, 2, 2)], torch.zeros(1, 2)
    feats = ExternalFeats("timm:resnet18", feats=maps, pooled_feat=pooled)
    leaves, spec = _pytree.tree_flatten(feats)
    assert len(leaves) == 2 and leaves[0] is maps[0] and leaves[1] is pooled
    rebuilt = _pytree.tree_unflatten([leaf + 1 for leaf in leaves], spec)
    assert type(rebuilt) is ExternalFeats and torch.equal(rebuilt["pooled_feat"], pooled + 1)
    with pytest.raises(UserError, match=r"^timm:resnet18 gives no pre-activation maps"):
        rebuilt["preact_feats"]


@pytest.mark.parametrize("name, small_input, stem_map", [
    ("resnet18", False, True), ("resnet18", True, True),       # the stem's ReLU
    ("mobilenet_v2", False, True), ("mobilenet_v2", True, True),  # features[1], stride 2
    ("convnext_tiny", False, False),                            # its first stage, stride 4
    ("vit_b_16", False, True),                                  # the patch embedding
])
def test_torchvision_families_declare_whether_the_first_map_is_the_stems(name, small_input,
                                                                        stem_map):
    model = build_model(f"torchvision:{name}", 10, image_size=64, small_input=small_input)
    infos = stage_info(model, 64)
    assert [i.stem for i in infos] == [stem_map] + [False] * (len(infos) - 1)


# ------------------------------------------------------------------- timm

@needs_timm
@pytest.mark.parametrize("name, stem_map", [("resnet18", True), ("convnext_atto", False),
                                            ("vit_tiny_patch16_224", False)])
def test_timm_models_declare_their_stem_from_timms_reductions(name, stem_map):
    model = build_model(f"timm:{name}", 10, image_size=32, small_input=True)
    assert provided_outputs(model) == LIBRARY_OUTPUTS
    infos = stage_info(model, 32)
    assert [i.stem for i in infos] == [stem_map] + [False] * (len(infos) - 1)
    _, feats = model.eval()(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match=rf"^timm:{name} gives no pre-activation maps"):
        feats["preact_feats"]


@needs_timm
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_timm_logits_come_from_the_pooled_feature_in_training(name):
    """One head call: with dropout on, the logits are the classifier applied to
    exactly the pooled feature returned (ResNet drops out inside pre_logits,
    MobileNetV3 after it)."""
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", 10, image_size=32, small_input=True).train()
    model.network.drop_rate = 0.5
    images = torch.randn(4, 3, 32, 32)
    logits, feats = model(images)
    classifier = model.network.get_classifier()
    assert torch.allclose(logits, classifier(feats["pooled_feat"]), atol=1e-5)
    again, _ = model(images)
    assert not torch.allclose(logits, again)             # the dropout is really on
    model.eval()
    logits, feats = model(images)
    assert torch.allclose(logits, classifier(feats["pooled_feat"]), atol=1e-5)
