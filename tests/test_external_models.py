"""torchvision and timm classifiers as teachers and students (models/external.py)."""
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.engine.builder import build_experiment
from mdistill.engine.checkpoint import load_model_weights
from mdistill.engine.launch import train
from mdistill.engine.trainer import Trainer
from mdistill.errors import UserError
from mdistill.models import build_model
from mdistill.models.external import ExternalFeats, _tokens_to_map

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")
NO_TIMM = "timm is an optional extra (pip install -e \".[timm]\"), not installed here"
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason=NO_TIMM)


def test_torchvision_resnet_gives_its_stages_in_mdistills_contract():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 10, image_size=32, small_input=True).eval()
    network = model.network
    assert network.conv1.stride == (1, 1) and isinstance(network.maxpool, torch.nn.Identity)
    images = torch.randn(2, 3, 32, 32)
    logits, feats = model(images)
    with torch.no_grad():
        stem = network.relu(network.bn1(network.conv1(images)))
        expected = [stem]
        for stage in (network.layer1, network.layer2, network.layer3, network.layer4):
            expected.append(stage(expected[-1]))
        pooled = torch.flatten(network.avgpool(expected[-1]), 1)
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == [
        (64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    for got, want in zip(feats["feats"], expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(feats["pooled_feat"], pooled, atol=1e-5)
    assert torch.allclose(logits, network.fc(pooled), atol=1e-5)
    # torchvision exposes no pre-activation maps, so none are made up.
    with pytest.raises(UserError, match=r"torchvision:resnet18 gives no pre-activation maps "
                                        r"\('preact_feats'\)"):
        feats["preact_feats"]


def test_without_small_input_the_imagenet_stem_is_kept():
    model = build_model("torchvision:resnet18", 10, image_size=32).eval()
    _, feats = model(torch.zeros(2, 3, 32, 32))
    assert [f.shape[-1] for f in feats["feats"]] == [16, 8, 4, 2, 1]


def test_features_sequence_models_give_the_last_block_of_each_resolution():
    model = build_model("torchvision:mobilenet_v2", 7, image_size=32, small_input=True).eval()
    logits, feats = model(torch.zeros(2, 3, 32, 32))
    sizes = [f.shape[-1] for f in feats["feats"]]
    assert sizes == [32, 16, 8, 4, 2] and logits.shape == (2, 7)
    assert feats["pooled_feat"].shape == (2, 1280)
    # Each chosen block is the last of its resolution in network.features.
    blocks, outputs = list(model.network.features), []
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        for block in blocks:
            x = block(x)
            outputs.append(x)
    last_of_size = {}
    for output in outputs:
        last_of_size[output.shape[-1]] = output
    for got in feats["feats"]:
        assert torch.allclose(got, last_of_size[got.shape[-1]], atol=1e-5)


def test_transformer_tokens_become_maps_without_the_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)   # 1 + 2x2 tokens
    maps = _tokens_to_map(tokens)
    assert maps.shape == (2, 3, 2, 2)
    # Patch (row r, column c) is token 1 + 2r + c; its features are the channels.
    assert torch.equal(maps[1, :, 1, 0], tokens[1, 1 + 2 * 1 + 0])
    assert torch.equal(maps[0, :, 0, 1], tokens[0, 2])


def test_unknown_names_list_the_closest():
    with pytest.raises(UserError, match=r"unknown torchvision model 'resnet188'; "
                                        r"did you mean resnet18\?"):
        build_model("torchvision:resnet188", 10)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)      # import timm raises ImportError
    with pytest.raises(UserError, match=r'needs timm: pip install -e "\.\[timm\]"'):
        build_model("timm:resnet18", 10)


def test_a_plain_torchvision_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    plain = torchvision.models.resnet18(num_classes=10)
    model = build_model("torchvision:resnet18", 10)
    load_model_weights(model, plain.state_dict(), "torchvision:resnet18", "plain.pth")
    assert torch.equal(model.network.layer3[1].conv2.weight, plain.layer3[1].conv2.weight)


def test_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(4)
    released = torchvision.models.resnet18().state_dict()          # 1000 classes
    torch.save(released, folder / os.path.basename(weights.url))
    model = build_model("torchvision:resnet18", 10, pretrained=True)
    state = model.network.state_dict()
    assert torch.equal(state["layer4.1.bn2.running_var"], released["layer4.1.bn2.running_var"])
    assert torch.equal(state["conv1.weight"], released["conv1.weight"])
    assert state["fc.weight"].shape == (10, 512)                  # a new classifier


def test_pretrained_weights_neither_cached_nor_downloadable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-f37072fd.pth")
    with pytest.raises(UserError) as caught:
        build_model("torchvision:resnet18", 10, pretrained=True)
    assert "not in the local cache" in str(caught.value) and expected in str(caught.value)


def test_pretrained_is_refused_for_zoo_models(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.STUDENT_PRETRAINED", "True")
    with pytest.raises(UserError, match="STUDENT_PRETRAINED is for torchvision:<name> and "
                                        "timm:<name> models, not 'resnet8'"):
        build_experiment(load_cfg(None, opts))


@pytest.fixture(scope="module")
def torchvision_teacher(tmp_path_factory):
    """Random torchvision resnet18 weights for 100 classes, saved as torchvision saves them."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=100).state_dict(), path)
    return str(path)


def evaluate_with_the_tool(checkpoint, tmp_path):
    """tools/eval.py's JSON row for one checkpoint."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/eval.py"), checkpoint,
                             "--device", "cpu", "--json", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "eval.json") as handle:
        row, = json.load(handle)
    return row


def test_kd_from_torchvision_resnet18_to_resnet8_trains_and_evaluates(
        cifar_root, torchvision_teacher, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path / "out", "DISTILLER.TEACHER", "torchvision:resnet18",
                     "DISTILLER.TEACHER_WEIGHTS", torchvision_teacher,
                     "DISTILLER.STUDENT", "resnet8", "EXPERIMENT.NAME", "tv_kd")
    run_dir, history = train(CONFIG, opts)
    assert [record["epoch"] for record in history] == [1, 2]
    with open(os.path.join(run_dir, "log.txt")) as handle:
        log = handle.read()
    assert f"teacher torchvision:resnet18 ({torchvision_teacher}): test top-1" in log
    best = max(record["test"]["top1"] for record in history)
    row = evaluate_with_the_tool(os.path.join(run_dir, "student_best"), tmp_path)
    assert row["model"] == "resnet8" and abs(row["top1"] - best) < 1e-6


def test_a_torchvision_student_alone_trains_and_evaluates(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path / "out", "DISTILLER.TYPE", "NONE",
                     "DISTILLER.STUDENT", "torchvision:shufflenet_v2_x0_5",
                     "EXPERIMENT.NAME", "tv_alone")
    run_dir, history = train(CONFIG, opts)
    student = torch.load(os.path.join(run_dir, "student_latest"), weights_only=True)
    assert "network.stage4.0.branch1.0.weight" in student["model"]
    row = evaluate_with_the_tool(os.path.join(run_dir, "student_latest"), tmp_path)
    assert row["model"] == "torchvision:shufflenet_v2_x0_5"
    assert abs(row["top1"] - history[-1]["test"]["top1"]) < 1e-6


def two_steps(trainer):
    trainer.distiller.train()
    trainer.distiller.on_epoch_start(1)
    trainer.train_loader.set_epoch(1)
    return [trainer.run_step(batch) for _, batch in zip(range(2), trainer.train_loader)]


@pytest.mark.parametrize("method", ["AT", "FITNET"])
def test_feature_method_between_a_torchvision_teacher_and_a_zoo_student(
        method, cifar_root, torchvision_teacher, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "torchvision:resnet18", "DISTILLER.TEACHER_WEIGHTS", torchvision_teacher,
                     "DISTILLER.STUDENT", "resnet8", "MODEL.SMALL_INPUT", "True")
    trainer = Trainer(build_experiment(load_cfg(CONFIG, opts)), None, log=lambda text: None)
    distiller = trainer.distiller
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    values = two_steps(trainer)
    assert all(value is not None and value["loss_feat"] > 0 for value in values)
    assert all(torch.isfinite(torch.tensor(list(value.values()))).all() for value in values)
    assert all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
    changed = [k for k, v in distiller.student.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, student_before[k])]
    assert "conv1.weight" in changed
    if method == "FITNET":      # layer2 of resnet18 (128 x 16 x 16) from resnet8's 32 x 16 x 16
        assert distiller.regressor.conv.weight.shape == (128, 32, 1, 1)


def test_fitnet_names_the_stage_whose_maps_cannot_pair(cifar_root, teacher_file, tmp_path):
    # A torchvision student without SMALL_INPUT: its stage 1 map is 8x8, the zoo
    # teacher's 32x32, which a regressor cannot map up.
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "FITNET", "FITNET.HINT_LAYER", "1",
                     "DISTILLER.TEACHER", "resnet20", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "DISTILLER.STUDENT", "torchvision:resnet18")
    with pytest.raises(UserError, match=r"feature stage 1 \(FITNET.HINT_LAYER\): FitNet cannot "
                                        r"map a 8x8 student map to a 32x32 teacher map"):
        build_experiment(load_cfg(CONFIG, opts))


def test_a_model_without_known_stages_stops_feature_methods_with_its_name():
    feats = ExternalFeats("torchvision:googlenet", pooled_feat=torch.zeros(2, 4))
    assert feats["pooled_feat"].shape == (2, 4)
    with pytest.raises(UserError, match=r"torchvision:googlenet gives no stage feature maps"):
        feats["feats"]


def test_external_teacher_without_weights_says_what_to_set(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "torchvision:resnet18",
                     "DISTILLER.STUDENT", "resnet8")
    with pytest.raises(UserError, match=r"teacher torchvision:resnet18 has no weights: set "
                                        r"DISTILLER.TEACHER_WEIGHTS"):
        build_experiment(load_cfg(CONFIG, opts))


# --------------------------------------------------------------------- timm
@needs_timm
def test_timm_resnet_gives_its_stages():
    model = build_model("timm:resnet18", 10, image_size=32, small_input=True).eval()
    images = torch.randn(2, 3, 32, 32)
    logits, feats = model(images)
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == [
        (64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    network = model.network
    with torch.no_grad():
        final = network.forward_features(images)
    assert torch.allclose(logits, network.forward_head(final), atol=1e-5)
    assert torch.allclose(feats["feats"][-1], final, atol=1e-5)
    assert torch.allclose(feats["pooled_feat"], final.mean(dim=(2, 3)), atol=1e-5)


@needs_timm
def test_timm_vit_tokens_of_four_blocks_become_maps():
    model = build_model("timm:vit_tiny_patch16_224", 10, image_size=32).eval()
    network = model.network
    assert model.indices == [2, 5, 8, 11]
    captured = []
    hooks = [network.blocks[index].register_forward_hook(
        lambda module, args, output: captured.append(output)) for index in model.indices]
    images = torch.randn(2, 3, 32, 32)
    _, feats = model(images)
    for hook in hooks:
        hook.remove()
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == [(192, 2, 2)] * 4
    prefix = network.num_prefix_tokens
    for tokens, got in zip(captured, feats["feats"]):
        expected = tokens[:, prefix:].transpose(1, 2).reshape(2, 192, 2, 2)
        assert torch.allclose(got, expected, atol=1e-5)


@needs_timm
def test_kd_steps_from_a_timm_teacher_to_a_zoo_student(cifar_root, tmp_path):
    import timm
    torch.manual_seed(6)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=100).state_dict(), path)
    for method in ("KD", "AT"):
        opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                         "timm:resnet18", "DISTILLER.TEACHER_WEIGHTS", str(path),
                         "DISTILLER.STUDENT", "resnet8", "MODEL.SMALL_INPUT", "True")
        trainer = Trainer(build_experiment(load_cfg(CONFIG, opts)), None, log=lambda text: None)
        values = two_steps(trainer)
        assert all(value is not None for value in values)
        teacher_logits, _ = trainer.distiller.teacher(torch.zeros(1, 3, 32, 32))
        assert teacher_logits.shape == (1, 100)


@needs_timm
def test_a_timm_student_learns(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "timm:resnet10t", "MODEL.SMALL_INPUT", "True")
    trainer = Trainer(build_experiment(load_cfg(CONFIG, opts)), None, log=lambda text: None)
    batch = next(iter(trainer.train_loader))
    trainer.distiller.train()
    before = F.cross_entropy(trainer.distiller.student(batch["image"])[0], batch["target"])
    for _ in range(3):
        trainer.run_step(batch)
    after = F.cross_entropy(trainer.distiller.student(batch["image"])[0], batch["target"])
    assert after < before


def test_replaced_modules_are_traced_again():
    """SyncBatchNorm's conversion (SOLVER.SYNC_BN) swaps the BatchNorm modules;
    the trace follows at the next train()/eval()."""
    model = build_model("torchvision:resnet18", 10, image_size=32, small_input=True).eval()
    images = torch.randn(2, 3, 32, 32)
    before = model(images)[0]
    model.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.network)
    with torch.no_grad():
        model.network.bn1.running_mean.fill_(5.0)     # only the new module sees this
    model.eval()
    assert isinstance(model.extractor().bn1, torch.nn.SyncBatchNorm)
    assert not torch.allclose(model(images)[0], before)
