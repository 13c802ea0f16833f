"""Stages pair by what the models declare (mdistill/models/stages.py), and AT,
NST, VID and KDSVD distil exactly the pairs it gives.

The published CIFAR pairs keep mdistiller's ``feats[1:]`` position pairing;
the pairs whose stage counts differ (ResNet50 -> MobileNetV1 on ImageNet, a
timm vision transformer with the zoo) pair the deepest stages with each other.
"""
import glob
import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.errors import UserError
from mdistill.models import (StageInfo, build_model, is_external, pair_model_stages, pair_stages,
                             stage_info)
from test_distiller_losses import (fake, image, np_attention, np_avg_pool,  # noqa: F401
                                   np_cross_entropy, one_thread)
from test_feature_methods import np_kdsvd, np_nst, np_vid

RNG = np.random.default_rng(11)
TARGET = torch.tensor([0, 2, 1, 2])
S_LOGITS = RNG.normal(size=(4, 3))
T_LOGITS = RNG.normal(size=(4, 3))
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="timm is an optional extra, not installed here")


def info(*strides, stem_first=True, channels=8):
    return [StageInfo(stride, stem_first and index == 0, channels)
            for index, stride in enumerate(strides)]


# ------------------------------------------------------------ pair_stages

def test_stems_never_pair_and_the_rest_pair_from_the_deepest():
    # Equal counts: position pairing of feats[1:].
    assert pair_stages(info(1, 1, 2, 4), info(1, 1, 2, 4)) == [(1, 1), (2, 2), (3, 3)]
    # A student without a stem map and a teacher with one: everything but the stem.
    assert pair_stages(info(4, 8, 16, 32, stem_first=False), info(2, 4, 8, 16, 32)) == [
        (0, 1), (1, 2), (2, 3), (3, 4)]
    # More teacher stages: the teacher's shallowest non-stem stage is left out.
    assert pair_stages(info(1, 1, 2, 4), info(1, 1, 2, 4, 8)) == [(1, 2), (2, 3), (3, 4)]
    # More student stages: the student's shallowest is left out.
    assert pair_stages(info(16, 16, 16, 16, stem_first=False), info(1, 1, 2)) == [(2, 1), (3, 2)]


def test_a_model_with_only_a_stem_names_itself():
    with pytest.raises(UserError, match=r"^tiny_net has no feature stage to pair besides its "
                                        r"stem \(1 map\(s\) in feats\['feats'\]\)"):
        pair_stages(info(1, 2), info(1), "resnet8", "tiny_net")
    with pytest.raises(UserError, match=r"^empty_student has no feature stage"):
        pair_stages([], info(1, 2), "empty_student", "resnet8")


# ------------------------------------------- published CIFAR pairs unchanged

def published_cifar_pairs():
    """Every distinct (teacher, student) of configs/cifar100: each method's file
    (resnet32x4 -> resnet8x4) and its pair folder."""
    pairs = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "configs/cifar100/*.yaml"))
                       + glob.glob(os.path.join(ROOT, "configs/cifar100/*/*.yaml"))):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = load_cfg(path, warn_ignored=False)
        # The zoo's pairs (mdistiller's); torchvision:/timm: pairs are not its.
        if cfg.DISTILLER.TYPE != "NONE" and cfg.DISTILLER.TEACHER and not any(
                map(is_external, (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT))):
            pairs.add((cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT))
    return sorted(pairs)


PUBLISHED = published_cifar_pairs()


def test_the_pair_folders_hold_the_published_pairs():
    assert ("resnet32x4", "resnet8x4") in PUBLISHED and ("ResNet50", "MobileNetV2") in PUBLISHED
    assert ("vgg13", "MobileNetV2") in PUBLISHED and ("wrn_40_2", "ShuffleV1") in PUBLISHED
    assert len(PUBLISHED) >= 9


@pytest.mark.parametrize("teacher_name, student_name", PUBLISHED)
def test_published_cifar_pairs_keep_mdistillers_position_pairing(teacher_name, student_name):
    torch.manual_seed(0)
    student, teacher = build_model(student_name, 100), build_model(teacher_name, 100)
    student_info, teacher_info = stage_info(student, 32), stage_info(teacher, 32)
    pairs = pair_model_stages(student, teacher, 32)
    if len(student_info) == len(teacher_info):          # why position pairing was right
        assert pairs == list(zip(range(1, len(student_info)), range(1, len(teacher_info))))
    else:   # a pair only methods without stage pairing use (CAT-KD, SDD): from the deepest
        shorter = min(sum(not info.stem for info in infos)
                      for infos in (student_info, teacher_info))
        assert len(pairs) == shorter
        assert pairs[-1] == (len(student_info) - 1, len(teacher_info) - 1)


# --------------------------------------------- pairs whose stage counts differ

def test_resnet50_to_mobilenetv1_pairs_maps_of_equal_size_at_224():
    """configs/imagenet/r50_mv1/at.yaml: MobileNetV1's feats have no stem map."""
    cfg = load_cfg(os.path.join(ROOT, "configs/imagenet/r50_mv1/at.yaml"), warn_ignored=False)
    assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("ResNet50", "MobileNetV1")
    torch.manual_seed(0)
    student = build_model("MobileNetV1", 1000, dataset="imagenet")
    teacher = build_model("ResNet50", 1000, dataset="imagenet")
    data = SimpleNamespace(num_classes=1000, image_size=224, num_train=8,
                           train_targets=torch.zeros(8, dtype=torch.long))
    distiller = build_distiller(cfg, student, teacher, data)
    assert distiller.stage_pairs == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with torch.no_grad():
        student_maps = student.eval()(torch.zeros(1, 3, 224, 224))[1]["feats"]
        teacher_maps = teacher.eval()(torch.zeros(1, 3, 224, 224))[1]["feats"]
    sizes = [(student_maps[s].shape[2:], teacher_maps[t].shape[2:])
             for s, t in distiller.stage_pairs]
    assert sizes == [((56, 56), (56, 56)), ((28, 28), (28, 28)), ((14, 14), (14, 14)),
                     ((7, 7), (7, 7))]
    # Position pairing of feats[1:] put MobileNetV1's 28x28 map with ResNet50's 56x56 one.
    assert student_maps[1].shape[2:] == (28, 28) and teacher_maps[1].shape[2:] == (56, 56)
    assert [i.stride for i in stage_info(student, 224)] == [4, 8, 16, 32]
    assert [(i.stride, i.stem) for i in stage_info(teacher, 224)] == [
        (2, True), (4, False), (8, False), (16, False), (32, False)]


@needs_timm
def test_a_timm_vision_transformer_has_no_stem_map_to_leave_out():
    torch.manual_seed(0)
    student = build_model("timm:vit_tiny_patch16_224", 10, image_size=32)
    teacher = build_model("MobileNetV2", 10)                 # stem, then four stages
    assert [i.stem for i in stage_info(student, 32)] == [False] * 4
    # All four transformer maps pair; feats[1:] would have dropped the first block's.
    assert pair_model_stages(student, teacher, 32) == [(0, 1), (1, 2), (2, 3), (3, 4)]


# ------------------------------------------ the methods distil those pairs

def uneven_maps():
    """A student (stem, two stages) and a teacher (stem, three stages)."""
    student = [RNG.normal(size=(4, 3, 4, 4)), np.abs(RNG.normal(size=(4, 2, 4, 4))),
               np.abs(RNG.normal(size=(4, 3, 2, 2)))]
    teacher = [RNG.normal(size=(4, 5, 4, 4)), np.abs(RNG.normal(size=(4, 4, 4, 4))),
               np.abs(RNG.normal(size=(4, 2, 2, 2))), np.abs(RNG.normal(size=(4, 6, 2, 2)))]
    return student, teacher


def np_at(s, t, p):
    """Mean over samples and positions of the squared difference of the attention
    maps; the larger map average-pooled to the smaller one first."""
    terms = []
    for s_sample, t_sample in zip(s, t):
        if s_sample.shape[1] > t_sample.shape[1]:
            s_sample = np_avg_pool(s_sample, t_sample.shape[1])
        elif t_sample.shape[1] > s_sample.shape[1]:
            t_sample = np_avg_pool(t_sample, s_sample.shape[1])
        terms += [(a - b) ** 2 for a, b in zip(np_attention(s_sample, p),
                                                np_attention(t_sample, p))]
    return sum(terms) / len(terms)


def test_at_distils_the_deepest_stages_when_the_teacher_has_more():
    student_feats, teacher_feats = uneven_maps()
    distiller = DISTILLERS.get("AT")(fake(S_LOGITS, student_feats), fake(T_LOGITS, teacher_feats),
                                     p=2, ce_weight=0.5, feat_weight=10.0, image_shape=(3, 4, 4))
    assert distiller.stage_pairs == [(1, 2), (2, 3)]
    distiller.train()
    _, losses = distiller(image(4), TARGET)
    expected = np_at(student_feats[1], teacher_feats[2], 2) + np_at(student_feats[2],
                                                                    teacher_feats[3], 2)
    assert losses["loss_feat"].item() == pytest.approx(10.0 * expected, rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(0.5 * np_cross_entropy(S_LOGITS, TARGET),
                                                     rel=1e-6)


def test_a_student_without_a_stem_map_distils_its_first_map():
    """A model class that declares ``stem_map = False`` (MobileNetV1) has no map
    to leave out: its feats[0] pairs with the teacher's first stage."""
    student_feats = [np.abs(RNG.normal(size=(4, 2, 4, 4))), np.abs(RNG.normal(size=(4, 3, 2, 2)))]
    _, teacher_feats = uneven_maps()
    student = fake(S_LOGITS, student_feats)
    student.stem_map = False
    distiller = DISTILLERS.get("AT")(student, fake(T_LOGITS, teacher_feats), p=2,
                                     feat_weight=1.0, image_shape=(3, 4, 4))
    assert distiller.stage_pairs == [(0, 2), (1, 3)]
    distiller.train()
    _, losses = distiller(image(4), TARGET)
    expected = np_at(student_feats[0], teacher_feats[2], 2) + np_at(student_feats[1],
                                                                    teacher_feats[3], 2)
    assert losses["loss_feat"].item() == pytest.approx(expected, rel=1e-5)


def test_nst_and_kdsvd_distil_the_deepest_stages_when_the_teacher_has_more():
    student_feats, teacher_feats = uneven_maps()
    nst = DISTILLERS.get("NST")(fake(S_LOGITS, student_feats), fake(T_LOGITS, teacher_feats),
                                feat_weight=7.0, image_shape=(3, 4, 4))
    kdsvd = DISTILLERS.get("KDSVD")(fake(S_LOGITS, student_feats), fake(T_LOGITS, teacher_feats),
                                    k=1, feat_weight=2.0, image_shape=(3, 4, 4))
    assert nst.stage_pairs == kdsvd.stage_pairs == [(1, 2), (2, 3)]
    students, teachers = student_feats[1:], teacher_feats[2:]
    for distiller, expected in ((nst, 7.0 * sum(np_nst(s, t) for s, t in zip(students, teachers))),
                                (kdsvd, 2.0 * np_kdsvd(students, teachers, 1))):
        distiller.train()
        _, losses = distiller(image(4), TARGET)
        assert losses["loss_feat"].item() == pytest.approx(expected, rel=1e-4)


def test_vid_builds_its_regressors_for_the_paired_stages():
    student_feats, teacher_feats = uneven_maps()
    distiller = DISTILLERS.get("VID")(fake(S_LOGITS, student_feats), fake(T_LOGITS, teacher_feats),
                                      feat_weight=3.0, image_shape=(3, 4, 4))
    assert distiller.stage_pairs == [(1, 2), (2, 3)]
    # student widths 2 -> teacher 2, student 3 -> teacher 6
    assert [(r[0].in_channels, r[-1].out_channels) for r in distiller.regressors] == [(2, 2),
                                                                                      (3, 6)]
    assert [s.shape[0] for s in distiller.log_scales] == [2, 6]
    distiller.train()
    _, losses = distiller(image(4), TARGET)
    expected = sum(
        np_vid(s, t, [layer.weight.detach().double().numpy() for layer in regressor[::2]],
               log_scale.detach().double().numpy(), 1e-5)
        for s, t, regressor, log_scale in zip(student_feats[1:], teacher_feats[2:],
                                              distiller.regressors, distiller.log_scales))
    assert losses["loss_feat"].item() == pytest.approx(3.0 * expected, rel=1e-5)


@pytest.mark.parametrize("method", ["AT", "NST", "VID", "KDSVD"])
def test_stage_methods_read_only_the_teachers_maps(method):
    cls = DISTILLERS.get(method)
    assert cls.teacher_reads == frozenset({"feats"})
    assert cls.student_reads == frozenset({"logits", "feats"})
    assert cls(fake(S_LOGITS, uneven_maps()[0]), fake(T_LOGITS, uneven_maps()[1]),
               image_shape=(3, 4, 4)).teacher_temperatures() is None


def test_a_teacher_with_only_a_stem_is_refused_with_its_name():
    student_feats, _ = uneven_maps()
    teacher = fake(T_LOGITS, [RNG.normal(size=(4, 2, 4, 4))])
    teacher.name = "stem_only_teacher"
    with pytest.raises(UserError, match=r"^stem_only_teacher has no feature stage to pair"):
        DISTILLERS.get("AT")(fake(S_LOGITS, student_feats), teacher, image_shape=(3, 4, 4))
