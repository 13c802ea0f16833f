"""OFD's teacher normalises with its batch's statistics by default, as its authors run it,
without moving its running statistics; OFD.TEACHER_BN eval keeps the running ones."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, tiny_opts
from mdistill.distillers.ofd import OFD
from mdistill.errors import UserError
from mdistill.models import build_model
from mdistill.utils.batchnorm import batch_statistics
from test_mdistiller_methods import np_partial_l2, np_pool, randomise_bns


def moved_statistics(model, generator):
    """Give every BN running statistics far from any batch's, and a count."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 2)
                module.num_batches_tracked.fill_(7)


def buffers(model):
    return {name: value.clone() for name, value in model.named_buffers()}


def test_batch_statistics_normalise_with_the_batch_and_touch_nothing():
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(5, generator=generator))
        bn.bias.copy_(torch.randn(5, generator=generator))
    moved_statistics(bn, generator)
    bn.eval()
    before = buffers(bn)
    x = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64) * 3 + 1
    with batch_statistics(bn):
        out = bn(x)
    # By hand: the batch's mean and (biased) variance per channel.
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1)
                + bn.bias.view(1, -1, 1, 1))
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out, F.batch_norm(x, None, None, bn.weight, bn.bias, training=True,
                                         eps=bn.eps))
    after = buffers(bn)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not bn.training and bn.track_running_stats
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                           bn.bias, training=False, eps=bn.eps))


def test_batch_statistics_change_only_the_norms_and_restore_them_after_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                          nn.BatchNorm2d(4, track_running_stats=False)).eval()
    model[1].train()                              # a mixed model: each flag comes back
    with pytest.raises(RuntimeError, match="inside"):
        with batch_statistics(model):
            assert [m.training for m in model] == [False, True, False, True]
            assert not model[1].track_running_stats
            raise RuntimeError("inside")
    assert [m.training for m in model] == [False, True, False, False]
    assert model[1].track_running_stats and not model[3].track_running_stats


def make_ofd(teacher_bn, seed=4):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student, teacher = build_model("vgg8", 10), build_model("resnet20", 10)
    randomise_bns(teacher, generator)
    moved_statistics(teacher, generator)
    distiller = OFD(student, teacher, feat_weight=0.01, teacher_bn=teacher_bn).eval()
    images = torch.randn(4, 3, 32, 32, generator=generator)
    return distiller, student, teacher, images


def expected_feature_loss(distiller, student, teacher_feats, images):
    """The partial L2 of the paper in float64, from the given teacher maps."""
    with torch.no_grad():
        _, feats = student(images)
        total = 0.0
        for index, connect in enumerate(distiller.connectors):
            mapped = connect(feats["preact_feats"][index + 2]).double().numpy()
            target = np_pool(teacher_feats["preact_feats"][index + 1].double().numpy(),
                             mapped.shape[2])
            margin = distiller.margins()[index].double().numpy()
            total += np_partial_l2(mapped, target, margin) / 2 ** (2 - index)
    return 0.01 * total


@pytest.mark.parametrize("teacher_bn", ["batch", "eval"])
def test_ofd_teacher_bn_gives_the_paper_loss_on_the_chosen_statistics(teacher_bn):
    distiller, student, teacher, images = make_ofd(teacher_bn)
    before = buffers(teacher)
    _, losses = distiller.forward_train(images, torch.tensor([0, 1, 2, 3]))
    # An independent reference: a copy of the teacher in plain train mode (batch
    # statistics) or in eval mode (running statistics, the earlier behaviour).
    reference = copy.deepcopy(teacher).train(teacher_bn == "batch")
    with torch.no_grad():
        _, teacher_feats = reference(images)
    expected = expected_feature_loss(distiller, student, teacher_feats, images)
    assert float(losses["loss_kd"].detach()) == pytest.approx(expected, rel=1e-4)
    after = buffers(teacher)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not teacher.training


def test_the_two_statistics_give_different_losses():
    values = []
    for teacher_bn in ("batch", "eval"):
        distiller, _, _, images = make_ofd(teacher_bn)
        _, losses = distiller.forward_train(images, torch.tensor([0, 1, 2, 3]))
        values.append(float(losses["loss_kd"].detach()))
    assert values[0] != pytest.approx(values[1], rel=1e-3)


def test_an_unknown_teacher_bn_is_refused_naming_the_key():
    with pytest.raises(UserError) as error:
        OFD(build_model("resnet8", 10), build_model("resnet20", 10), teacher_bn="train")
    assert str(error.value) == "unknown value for OFD.TEACHER_BN: 'train'; valid: batch, eval"


def test_the_config_key_reaches_the_method(cifar_root, teacher_file, tmp_path):
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    config = os.path.join(ROOT, "configs/cifar100/ofd.yaml")
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file)
    assert build_experiment(load_cfg(config, opts)).distiller.teacher_bn == "batch"
    eval_run = build_experiment(load_cfg(config, opts + ["OFD.TEACHER_BN", "eval"]))
    assert eval_run.distiller.teacher_bn == "eval"
    with pytest.raises(UserError, match="OFD.TEACHER_BN"):
        build_experiment(load_cfg(config, opts + ["OFD.TEACHER_BN", "running"]))
