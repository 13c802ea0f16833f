"""The model zoo: names, forward contract, and mdistiller/torchvision parameter layouts."""
import pytest
import torch
import torchvision

from mdistill.errors import UserError
from mdistill.models import build_model, model_names

CIFAR = model_names("cifar100")
IMAGENET = model_names("imagenet")


def test_every_reference_name_is_registered():
    assert set(CIFAR) == {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "ResNet18", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1",
        "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1",
        "ShuffleV2"}
    assert set(IMAGENET) == {"ResNet18", "ResNet34", "ResNet50", "ResNet101", "MobileNetV1"}


def test_unknown_name_lists_the_closest_first():
    with pytest.raises(UserError, match=r"unknown CIFAR model 'resnet8x3'; valid: resnet8x4"):
        build_model("resnet8x3", 100)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_forward_contract(name):
    model = build_model(name, 100).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert len(feats["feats"]) == len(feats["preact_feats"]) >= 4
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        assert feat.shape == preact.shape and feat.shape[0] == 2
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert feats["pooled_feat"].shape == (2, classifier.in_features)
    # Stages shrink (or keep) the spatial size, never grow it.
    sizes = [feat.shape[-1] for feat in feats["feats"]]
    assert sizes == sorted(sizes, reverse=True)


def test_resnet8x4_matches_mdistiller_layout():
    state = build_model("resnet8x4", 100).state_dict()
    assert len(state) == 62
    assert sum(p.numel() for p in build_model("resnet8x4", 100).parameters()) == 1_233_540
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes["conv1.weight"] == (32, 3, 3, 3)
    assert shapes["layer1.0.conv1.weight"] == (64, 32, 3, 3)
    assert shapes["layer1.0.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 32, 1, 1)
    assert shapes["layer3.0.downsample.0.weight"] == (256, 128, 1, 1)
    assert shapes["fc.weight"] == (100, 256) and "fc.bias" in shapes
    assert not any(key.startswith("conv") and key.endswith("bias") for key in shapes)
    resnet32x4 = build_model("resnet32x4", 100).state_dict()
    assert len(resnet32x4) == 206
    assert "layer1.1.downsample.0.weight" not in resnet32x4 and "layer1.4.conv2.weight" in resnet32x4


def test_wrn_16_2_matches_mdistiller_layout():
    shapes = {k: tuple(v.shape) for k, v in build_model("wrn_16_2", 100).state_dict().items()}
    assert shapes["conv1.weight"] == (16, 3, 3, 3)
    assert shapes["block1.layer.0.conv1.weight"] == (32, 16, 3, 3)
    assert shapes["block1.layer.0.convShortcut.weight"] == (32, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in shapes
    assert {"block1.layer.0.bn1.running_mean", "block1.layer.0.bn2.weight", "bn1.weight",
            "block3.layer.1.conv2.weight"} <= set(shapes)
    assert shapes["fc.weight"] == (100, 128)


def test_vgg8_matches_mdistiller_layout():
    shapes = {k: tuple(v.shape) for k, v in build_model("vgg8", 100).state_dict().items()}
    assert shapes["block0.0.weight"] == (64, 3, 3, 3) and shapes["block0.0.bias"] == (64,)
    assert "block0.1.running_var" in shapes and "block0.2.weight" not in shapes
    assert shapes["classifier.weight"] == (100, 512)


def test_known_parameter_counts():
    # Counts reported for these CIFAR-100 models by the CRD/mdistiller papers (in millions).
    expected = {"resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "vgg13": 9.46,
                "vgg8": 3.96, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
                "resnet56": 0.86, "resnet20": 0.28, "ResNet50": 23.71}
    for name, millions in expected.items():
        count = sum(p.numel() for p in build_model(name, 100).parameters())
        assert abs(count / 1e6 - millions) < 0.01, (name, count)


def test_mdistiller_checkpoint_loads_strictly(tmp_path):
    teacher = build_model("wrn_40_2", 100)
    torch.save({"model": teacher.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    loaded = torch.load(tmp_path / "ckpt_epoch_240.pth", weights_only=True)
    fresh = build_model("wrn_40_2", 100)
    fresh.load_state_dict(loaded["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 teacher.state_dict().values()))


@pytest.mark.parametrize("name,reference", [("ResNet18", torchvision.models.resnet18),
                                            ("ResNet34", torchvision.models.resnet34),
                                            ("ResNet50", torchvision.models.resnet50)])
def test_imagenet_resnets_use_torchvision_parameters(name, reference):
    ours = build_model(name, 1000, dataset="imagenet")
    theirs = reference(weights=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = ours(image)
        assert torch.allclose(logits, theirs(image), atol=1e-5)
    assert len(feats["feats"]) == 5 and feats["pooled_feat"].shape[1] == theirs.fc.in_features


def test_imagenet_mobilenet_v1_forward():
    logits, feats = build_model("MobileNetV1", 1000, dataset="imagenet").eval()(
        torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000)
    assert [f.shape[1] for f in feats["feats"]] == [128, 256, 512, 1024]
