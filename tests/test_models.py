"""The model zoo: names, the forward contract and feature positions, and the
mdistiller / torchvision parameter layouts that released weights need."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mdistill.errors import UserError
from mdistill.models import build_model, model_names, torchvision_weights
from mdistill.models.common import channel_shuffle, interleave

CIFAR = model_names("cifar100")
IMAGENET = model_names("imagenet")


def _resnet(widths):
    return [(widths[0], 32, 32), (widths[1], 32, 32), (widths[2], 16, 16), (widths[3], 8, 8)]


def _resnet_v2(expansion):
    return [(64, 32, 32), (64 * expansion, 32, 32), (128 * expansion, 16, 16),
            (256 * expansion, 8, 8), (512 * expansion, 4, 4)]


VGG_FEATS = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]

# name -> (feats shapes (C, H, W) for a 32x32 input, pooled_feat width), as mdistiller's models.
CIFAR_FEATURES = {
    **{f"resnet{depth}": (_resnet((16, 16, 32, 64)), 64) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (_resnet((32, 64, 128, 256)), 256),
    "resnet32x4": (_resnet((32, 64, 128, 256)), 256),
    "ResNet18": (_resnet_v2(1), 512),
    "ResNet50": (_resnet_v2(4), 2048),
    "wrn_16_1": (_resnet((16, 16, 32, 64)), 64),
    "wrn_40_1": (_resnet((16, 16, 32, 64)), 64),
    "wrn_16_2": (_resnet((16, 32, 64, 128)), 128),
    "wrn_40_2": (_resnet((16, 32, 64, 128)), 128),
    **{name: (VGG_FEATS, 512) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
    "ShuffleV1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "ShuffleV2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
}


def _forward(model, images):
    with torch.no_grad():
        return model(images)


def _classifier(model):
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]


def _shapes(state):
    return {key: tuple(value.shape) for key, value in state.items()}


def _bn(prefix, channels):
    entries = {f"{prefix}.{name}": (channels,)
               for name in ("weight", "bias", "running_mean", "running_var")}
    return entries | {f"{prefix}.num_batches_tracked": ()}


def _close(first, second):
    # Relative to the tensor's scale: untrained deep nets have large activations and
    # a different memory format sums in another order.
    if first.shape != second.shape:
        return False
    return bool((first - second).abs().max() <= 1e-4 * first.abs().max() + 1e-5)


def test_every_reference_name_is_registered():
    assert set(CIFAR) == set(CIFAR_FEATURES)
    assert set(IMAGENET) == {"ResNet18", "ResNet34", "ResNet50", "ResNet101", "MobileNetV1"}
    # Every 32x32 dataset uses the CIFAR family.
    assert model_names("digits") == model_names("synthetic") == CIFAR


def test_unknown_names_suggest_the_closest_and_list_every_valid_name_sorted():
    with pytest.raises(UserError) as error:
        build_model("resnet8x3", 100)
    assert str(error.value) == (f"unknown CIFAR model 'resnet8x3'; did you mean resnet8x4? "
                                f"valid: {', '.join(sorted(CIFAR))}")
    with pytest.raises(UserError) as error:
        build_model("resnet18", 1000, dataset="imagenet")
    assert str(error.value).startswith("unknown ImageNet model 'resnet18'; did you mean ResNet18? "
                                       "valid: ")
    assert str(error.value).endswith(f"valid: {', '.join(sorted(IMAGENET))}")
    from mdistill.registry import Registry
    registry = Registry("thing")
    for name in ("zeta", "Beta", "alpha"):
        registry.register(name, object())
    with pytest.raises(UserError, match=r"^unknown thing 'q'; valid: Beta, alpha, zeta$"):
        registry.get("q")


def test_dataset_picks_the_family():
    assert build_model("ResNet18", 10, dataset="synthetic").conv1.weight.shape == (64, 3, 3, 3)
    assert build_model("ResNet18", 10, dataset="imagenet").conv1.weight.shape == (64, 3, 7, 7)
    assert _classifier(build_model("wrn_16_2", 10, dataset="digits")).out_features == 10


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_forward_contract(name):
    model = build_model(name, 100).eval()
    images = torch.randn(2, 3, 32, 32)
    original = images.clone()
    logits, feats = _forward(model, images)
    assert torch.equal(images, original)
    assert logits.shape == (2, 100)
    assert set(feats) == {"feats", "preact_feats", "pooled_feat"}
    shapes, pooled_width = CIFAR_FEATURES[name]
    assert [tuple(feat.shape[1:]) for feat in feats["feats"]] == shapes
    assert [feat.shape for feat in feats["preact_feats"]] == [feat.shape for feat in feats["feats"]]
    assert feats["pooled_feat"].shape == (2, pooled_width) == (2, _classifier(model).in_features)
    assert _close(_classifier(model)(feats["pooled_feat"]), logits)


@pytest.mark.parametrize("name", [name for name in CIFAR if name.lower().startswith(
    ("resnet", "vgg", "shufflev"))])
def test_post_relu_families_feats_are_relu_of_preact(name):
    logits, feats = _forward(build_model(name, 100).eval(), torch.randn(2, 3, 32, 32))
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        assert torch.equal(feat, F.relu(preact))
    assert all((preact < 0).any() for preact in feats["preact_feats"])
    if name != "ShuffleV2":     # which pools its 1x1 head conv's output instead
        assert _close(feats["pooled_feat"], feats["feats"][-1].mean((2, 3)))


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_40_2"])
def test_wrn_feats_are_raw_outputs_and_preacts_the_next_bn(name):
    model = build_model(name, 100).eval()
    logits, feats = _forward(model, torch.randn(2, 3, 32, 32))
    maps, preacts = feats["feats"], feats["preact_feats"]
    assert all((feat < 0).any() for feat in maps)
    with torch.no_grad():
        assert _close(preacts[1], model.block2.layer[0].bn1(maps[1]))
        assert _close(preacts[2], model.block3.layer[0].bn1(maps[2]))
        assert _close(preacts[3], model.bn1(maps[3]))
        assert _close(preacts[0], model.block1.layer[0].bn1(maps[0]))
    assert _close(feats["pooled_feat"], F.relu(preacts[3]).mean((2, 3)))


def _bn_shift_moves(model, images, index, record):
    """Set the record's BN to output its shift alone; True when moving that shift
    by -3 moves exactly the record's channels of preact_feats[index] by -3."""
    bn = record.bn
    saved = bn.weight.detach().clone(), bn.bias.detach().clone()
    try:
        with torch.no_grad():
            bn.weight.zero_()
            bn.bias.zero_()
            before = model(images)[1]["preact_feats"][index]
            bn.bias.fill_(-3.0)
            after = model(images)[1]["preact_feats"][index]
    finally:
        with torch.no_grad():
            bn.weight.copy_(saved[0])
            bn.bias.copy_(saved[1])
    moved = torch.zeros(before.shape[1], dtype=torch.bool)
    moved[record.channels] = True
    change = after - before
    tolerance = 1e-5 * before.abs().max() + 1e-5     # the residual's rounding
    return bool(moved.any() and ((change[:, moved] + 3).abs() <= tolerance).all()
                and (change[:, ~moved] == 0).all())


@pytest.mark.parametrize("dataset,name", [("cifar100", name) for name in CIFAR]
                         + [("imagenet", name) for name in IMAGENET])
def test_bn_before_relu_is_the_last_layer_before_each_preact(dataset, name):
    """OFD's margins come from these BNs: each one's output must reach its map
    (its channels) with nothing but a residual added, and no ReLU between."""
    model = build_model(name, 10, dataset=dataset).eval()
    images = torch.randn(2, 3, *((32, 32) if dataset == "cifar100" else (64, 64)))
    records = model.bn_before_relu()
    _, feats = _forward(model, images)
    assert len(records) == len(feats["preact_feats"])
    for index, record in enumerate(records):
        assert isinstance(record.bn, torch.nn.BatchNorm2d)
        assert _bn_shift_moves(model, images, index, record), index


def test_shufflenet_v2_preacts_hold_mdistillers_values_in_the_output_order():
    model = build_model("ShuffleV2", 100).eval()
    unit, x = model.layer3[-1], F.relu(torch.randn(2, 464, 4, 4))  # a unit's input is post-ReLU
    with torch.no_grad():
        out, preact = unit(x)
        branch = unit.bn3(unit.conv3(unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x[:, 232:])))))))
    # mdistiller's preact is cat([kept, branch]); ours is shuffled like the output.
    assert _close(preact, channel_shuffle(torch.cat([x[:, :232], branch], 1), 2))
    assert torch.equal(out, F.relu(preact))


def test_wrn_blocks_follow_mdistiller():
    """A width-changing block feeds BN-ReLU(x) to both paths; the others add raw x."""
    model = build_model("wrn_16_2", 100).eval()
    with torch.no_grad():
        block, x = model.block2.layer[1], torch.randn(2, 64, 16, 16)
        out = block.conv1(F.relu(block.bn1(x)))
        assert _close(block(x), block.conv2(F.relu(block.bn2(out))) + x)
        block, x = model.block2.layer[0], torch.randn(2, 32, 32, 32)
        activated = F.relu(block.bn1(x))
        out = block.conv2(F.relu(block.bn2(block.conv1(activated))))
        result, normed = block(x)
        assert _close(result, out + block.convShortcut(activated))
        assert _close(normed, block.bn1(x))


def _shuffle_reference(x, groups):
    batch, channels, height, width = x.shape
    return x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(
        batch, channels, height, width)


def test_shufflenet_units_follow_the_papers():
    """Every unit, not just a stage's last, against the formulas written out."""
    torch.manual_seed(0)
    v2 = build_model("ShuffleV2", 100).eval()
    with torch.no_grad():
        unit, x = v2.layer2[1], torch.randn(2, 232, 8, 8)
        kept, changed = x[:, :116], x[:, 116:]
        branch = F.relu(unit.bn1(unit.conv1(changed)))
        branch = F.relu(unit.bn3(unit.conv3(unit.bn2(unit.conv2(branch)))))
        assert _close(unit(x), _shuffle_reference(torch.cat([kept, branch], 1), 2))
        down, x = v2.layer1[0], torch.randn(2, 24, 32, 32)
        left = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(x)))))
        right = down.bn4(down.conv4(F.relu(down.bn3(down.conv3(x)))))
        right = F.relu(down.bn5(down.conv5(right)))
        assert _close(down(x), _shuffle_reference(torch.cat([left, right], 1), 2))
    v1 = build_model("ShuffleV1", 100).eval()
    with torch.no_grad():
        unit, x = v1.layer2[1], torch.randn(2, 480, 8, 8)
        out = _shuffle_reference(F.relu(unit.bn1(unit.conv1(x))), 3)
        out = unit.bn3(unit.conv3(F.relu(unit.bn2(unit.conv2(out)))))
        assert _close(unit(x), F.relu(out + x))
        unit, x = v1.layer2[0], torch.randn(2, 240, 16, 16)
        out = _shuffle_reference(F.relu(unit.bn1(unit.conv1(x))), 3)
        out = unit.bn3(unit.conv3(F.relu(unit.bn2(unit.conv2(out)))))
        expected = F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        assert _close(unit(x), expected)


def test_mobilenet_v2_features_are_linear_bottlenecks():
    model = build_model("MobileNetV2", 100).eval()
    logits, feats = _forward(model, torch.randn(2, 3, 32, 32))
    assert all(a is b for a, b in zip(feats["feats"][1:], feats["preact_feats"][1:]))
    assert torch.equal(feats["feats"][0], F.relu(feats["preact_feats"][0]))
    assert (feats["feats"][0] >= 0).all() and all((f < 0).any() for f in feats["feats"][1:])


@pytest.mark.parametrize("name", CIFAR)
def test_gradients_reach_every_parameter_through_all_features(name):
    # Fails if an in-place op overwrote a tensor that a returned feature needs.
    model = build_model(name, 100).train()
    logits, feats = model(torch.randn(2, 3, 32, 32))
    loss = logits.square().mean() + feats["pooled_feat"].square().mean()
    for feat in feats["feats"] + feats["preact_feats"]:
        loss = loss + feat.square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", CIFAR)
def test_channels_last_gives_the_same_results(name):
    model = build_model(name, 100).eval()
    images = torch.randn(2, 3, 32, 32)
    logits, feats = _forward(model, images)
    model = model.to(memory_format=torch.channels_last)
    logits_cl, feats_cl = _forward(model, images.to(memory_format=torch.channels_last))
    assert _close(logits, logits_cl)
    for first, second in zip(feats["feats"] + feats["preact_feats"],
                             feats_cl["feats"] + feats_cl["preact_feats"]):
        assert _close(first, second)
    # The ShuffleNets' shuffles keep a channels_last network channels_last.
    assert all(feat.is_contiguous(memory_format=torch.channels_last)
               for feat in feats_cl["feats"] if feat.shape[-1] > 1)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2"])
def test_bf16_channels_last_training_step(name):
    model = build_model(name, 100).train().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = model(images)
        loss = F.cross_entropy(logits.float(), torch.tensor([1, 2]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_channel_shuffle_and_interleave():
    images = torch.arange(6.0).reshape(1, 6, 1, 1).expand(1, 6, 2, 2)
    assert channel_shuffle(images, 3)[0, :, 0, 0].tolist() == [0, 2, 4, 1, 3, 5]
    assert channel_shuffle(images, 1) is images
    for memory_format in (torch.contiguous_format, torch.channels_last):
        whole = torch.randn(2, 8, 3, 3).contiguous(memory_format=memory_format)
        first, second = whole.chunk(2, dim=1)  # views, as ShuffleNet V2's kept half
        expected = channel_shuffle(torch.cat([first, second], 1), 2)
        assert torch.equal(interleave(first, second), expected)
        assert torch.equal(channel_shuffle(whole, 2),
                           channel_shuffle(whole.contiguous(), 2))
        assert channel_shuffle(whole, 2).is_contiguous(memory_format=memory_format)


# mdistiller layouts: the released teachers are {"model": state_dict} with exactly these keys.

def _cifar_resnet_state(widths, blocks_per_stage):
    expected = {"conv1.weight": (widths[0], 3, 3, 3)} | _bn("bn1", widths[0])
    in_channels = widths[0]
    for stage, channels in enumerate(widths[1:], start=1):
        for block in range(blocks_per_stage):
            prefix = f"layer{stage}.{block}"
            expected[f"{prefix}.conv1.weight"] = (channels, in_channels, 3, 3)
            expected |= _bn(f"{prefix}.bn1", channels)
            expected[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
            expected |= _bn(f"{prefix}.bn2", channels)
            if in_channels != channels:
                expected[f"{prefix}.downsample.0.weight"] = (channels, in_channels, 1, 1)
                expected |= _bn(f"{prefix}.downsample.1", channels)
            in_channels = channels
    return expected | {"fc.weight": (100, widths[3]), "fc.bias": (100,)}


def test_resnet8x4_matches_mdistiller_layout():
    model = build_model("resnet8x4", 100)
    state = model.state_dict()
    assert len(state) == 62
    assert sum(p.numel() for p in model.parameters()) == 1_233_540
    shapes = _shapes(state)
    assert shapes == _cifar_resnet_state((32, 64, 128, 256), 1)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 32, 1, 1)
    assert shapes["fc.weight"] == (100, 256)
    assert not any(key.endswith("bias") and "conv" in key for key in shapes)


def test_resnet32x4_matches_mdistiller_layout():
    shapes = _shapes(build_model("resnet32x4", 100).state_dict())
    assert len(shapes) == 206
    assert shapes == _cifar_resnet_state((32, 64, 128, 256), 5)
    assert "layer2.1.downsample.0.weight" not in shapes


def _wrn_state(depth, widen):
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    expected = {"conv1.weight": (16, 3, 3, 3)}
    for group in range(1, 4):
        in_channels, channels = widths[group - 1], widths[group]
        for block in range((depth - 4) // 6):
            prefix = f"block{group}.layer.{block}"
            expected |= _bn(f"{prefix}.bn1", in_channels)
            expected[f"{prefix}.conv1.weight"] = (channels, in_channels, 3, 3)
            expected |= _bn(f"{prefix}.bn2", channels)
            expected[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
            if in_channels != channels:
                expected[f"{prefix}.convShortcut.weight"] = (channels, in_channels, 1, 1)
            in_channels = channels
    return expected | _bn("bn1", widths[3]) | {"fc.weight": (100, widths[3]), "fc.bias": (100,)}


@pytest.mark.parametrize("name,depth,widen", [("wrn_16_2", 16, 2), ("wrn_40_2", 40, 2),
                                              ("wrn_16_1", 16, 1)])
def test_wrn_matches_mdistiller_layout(name, depth, widen):
    shapes = _shapes(build_model(name, 100).state_dict())
    assert shapes == _wrn_state(depth, widen)
    if name == "wrn_16_2":
        assert shapes["block1.layer.0.convShortcut.weight"] == (32, 16, 1, 1)
        assert shapes["fc.weight"] == (100, 128) and "bn1.running_var" in shapes
        assert "block1.layer.1.convShortcut.weight" not in shapes


@pytest.mark.parametrize("name,layout", [
    ("vgg8", ((64,), (128,), (256,), (512,), (512,))),
    ("vgg13", ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)))])
def test_vgg_matches_mdistiller_layout(name, layout):
    expected, in_channels = {}, 3
    for block, widths in enumerate(layout):
        for position, width in enumerate(widths):
            prefix = f"block{block}.{3 * position}"
            expected[f"{prefix}.weight"] = (width, in_channels, 3, 3)
            expected[f"{prefix}.bias"] = (width,)
            expected |= _bn(f"block{block}.{3 * position + 1}", width)
            in_channels = width
    expected |= {"classifier.weight": (100, 512), "classifier.bias": (100,)}
    assert _shapes(build_model(name, 100).state_dict()) == expected


def test_other_cifar_layouts_name_mdistillers_modules():
    shapes = _shapes(build_model("ResNet50", 100).state_dict())
    assert shapes["layer1.0.shortcut.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["linear.weight"] == (100, 2048) and len(shapes) == 320
    shapes = _shapes(build_model("MobileNetV2", 100).state_dict())
    assert shapes["conv1.0.weight"] == (16, 3, 3, 3)
    assert shapes["blocks.6.0.conv.6.weight"] == (160, 480, 1, 1)
    assert shapes["conv2.0.weight"] == (1280, 160, 1, 1)
    assert shapes["classifier.0.weight"] == (100, 1280)
    shapes = _shapes(build_model("ShuffleV1", 100).state_dict())
    assert shapes["layer1.0.conv1.weight"] == (54, 24, 1, 1)  # ungrouped: 24 inputs
    assert shapes["layer2.0.conv1.weight"] == (60, 80, 1, 1)  # 3 groups
    assert shapes["linear.weight"] == (100, 960)
    shapes = _shapes(build_model("ShuffleV2", 100).state_dict())
    assert shapes["layer1.0.conv1.weight"] == (24, 1, 3, 3)
    assert shapes["layer1.3.conv3.weight"] == (58, 58, 1, 1)
    assert "layer1.4.conv1.weight" not in shapes  # a downsampling unit, then 3
    assert shapes["conv2.weight"] == (1024, 464, 1, 1) and shapes["linear.weight"] == (100, 1024)


def test_parameter_counts_match_the_published_ones():
    # Millions of parameters reported for these CIFAR-100 models (CRD / mdistiller papers).
    published = {"resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "vgg13": 9.46,
                 "vgg8": 3.96, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
                 "resnet56": 0.86, "resnet110": 1.73, "resnet20": 0.28, "ResNet50": 23.71}
    for name, millions in published.items():
        count = sum(p.numel() for p in build_model(name, 100).parameters())
        assert abs(count / 1e6 - millions) < 0.01, (name, count)


# Frozen facts: the state_dict keys and shapes of every CIFAR model of mdistiller
# (num_classes 100), written once from its mdistiller/models/cifar/*.py. Released
# teacher checkpoints load only if ours are exactly these.
with open(os.path.join(os.path.dirname(__file__), "fixtures",
                       "mdistiller_cifar_state_dicts.json")) as _handle:
    MDISTILLER_LAYOUTS = json.load(_handle)["models"]
MDISTILLER_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")


def _shape(text):
    return tuple(int(size) for size in text.split("x")) if text else ()


def test_every_cifar_model_of_mdistiller_is_ours():
    assert set(MDISTILLER_LAYOUTS) <= set(CIFAR)
    assert len(MDISTILLER_LAYOUTS) == 23


@pytest.mark.parametrize("arch", sorted(MDISTILLER_LAYOUTS))
def test_state_dict_keys_and_shapes_are_mdistillers(arch):
    theirs = {key: _shape(text) for key, text in MDISTILLER_LAYOUTS[arch].items()}
    ours = _shapes(build_model(arch, 100).state_dict())
    assert sorted(set(theirs) - set(ours)) == [], "keys mdistiller has and we lack"
    assert sorted(set(ours) - set(theirs)) == [], "keys we have and mdistiller lacks"
    assert {key: ours[key] for key in theirs if ours[key] != theirs[key]} == {}


@pytest.mark.parametrize("arch", MDISTILLER_TEACHERS)
def test_a_checkpoint_in_mdistillers_layout_loads_strictly(arch, tmp_path):
    from mdistill.engine.checkpoint import extract_state_dict, load_checkpoint, load_model_weights
    # Built from the frozen layout alone, as mdistiller's trainer saves it.
    state = {key: torch.full(_shape(text), 0.5) if text else torch.tensor(240)
             for key, text in MDISTILLER_LAYOUTS[arch].items()}
    path = tmp_path / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": state, "epoch": 240}, path)
    model = build_model(arch, 100)
    load_model_weights(model, extract_state_dict(load_checkpoint(str(path)), str(path)), arch,
                       str(path))
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


# ImageNet

TORCHVISION = {"ResNet18": torchvision.models.resnet18, "ResNet34": torchvision.models.resnet34,
               "ResNet50": torchvision.models.resnet50}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_resnets_are_torchvisions(name):
    ours = build_model(name, 1000, dataset="imagenet")
    theirs = TORCHVISION[name](weights=None)
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    # feats must be torchvision's stem ReLU (before the max-pool) and stage outputs.
    caught = []
    for module in (theirs.relu, theirs.layer1, theirs.layer2, theirs.layer3, theirs.layer4):
        module.register_forward_hook(lambda module, inputs, output: caught.append(output.clone()))
    images = torch.randn(2, 3, 64, 64)
    logits, feats = _forward(ours, images)
    assert _close(logits, _forward(theirs, images))
    assert len(feats["feats"]) == len(caught) == 5
    for feat, reference in zip(feats["feats"], caught):
        assert _close(feat, reference)
    assert feats["feats"][0].shape[-1] == 32  # 64x64 input, before the max-pool
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        assert torch.equal(feat, F.relu(preact))
    assert feats["pooled_feat"].shape == (2, theirs.fc.in_features)


@pytest.mark.parametrize("name,enum", [("ResNet18", torchvision.models.ResNet18_Weights),
                                       ("ResNet34", torchvision.models.ResNet34_Weights),
                                       ("ResNet50", torchvision.models.ResNet50_Weights),
                                       ("ResNet101", torchvision.models.ResNet101_Weights)])
def test_torchvision_weights_fit_the_models(name, enum):
    weights = torchvision_weights(name)
    assert weights is enum.IMAGENET1K_V1  # what mdistiller's ImageNet teachers used
    model = build_model(name, 1000, dataset="imagenet")
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]
    assert torchvision_weights("MobileNetV1") is None


def test_imagenet_mobilenet_v1_matches_mdistiller():
    model = build_model("MobileNetV1", 1000, dataset="imagenet").eval()
    shapes = _shapes(model.state_dict())
    assert len(shapes) == 164 and sum(p.numel() for p in model.parameters()) == 4_231_976
    assert shapes["model.0.0.weight"] == (32, 3, 3, 3) and "model.0.1.running_var" in shapes
    assert shapes["model.1.0.weight"] == (32, 1, 3, 3)
    assert shapes["model.1.3.weight"] == (64, 32, 1, 1)
    assert shapes["model.13.4.weight"] == (1024,) and shapes["fc.weight"] == (1000, 1024)
    logits, feats = _forward(model, torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    # As in mdistiller: no stem map, the outputs of units 3, 5, 11 and 13.
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == [(128, 16, 16), (256, 8, 8),
                                                            (512, 4, 4), (1024, 2, 2)]
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        assert torch.equal(feat, F.relu(preact))
    assert _close(feats["pooled_feat"], feats["feats"][-1].mean((2, 3)))


def test_imagenet_resnet101_forward():
    model = build_model("ResNet101", 10, dataset="imagenet").eval()
    logits, feats = _forward(model, torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 10)
    assert [f.shape[1] for f in feats["feats"]] == [64, 256, 512, 1024, 2048]
