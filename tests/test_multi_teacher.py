"""Several teachers at once: DISTILLER.TEACHERS, TEACHERS_WEIGHTS, TEACHER_REDUCE,
FEATURE_TEACHER.

Expected losses are computed here in float64 numpy from the definitions:
mean_probs distils from the average of the teachers' softened predictions,
mean_loss averages one KD loss per teacher.
"""
import copy
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_opts
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.engine.builder import build_experiment
from mdistill.errors import UserError
from mdistill.models import build_model
from test_distiller_losses import one_thread  # noqa: F401  (autouse: one thread)
from test_distillers import CONFIG, STUDENT_FOR, make_trainer, two_steps

DATA = SimpleNamespace(num_classes=100, image_size=32, train_targets=torch.arange(200) % 100)
#: Methods that read nothing of the teacher but its logits (declared on the class).
LOGIT_METHODS = [name for name in DISTILLERS.names()
                 if set(DISTILLERS.get(name).teacher_reads) == {"logits"}]


def models(seed_student=0, teacher_seeds=(1, 2)):
    torch.manual_seed(seed_student)
    student = build_model("resnet8", 100)
    teachers = []
    for seed in teacher_seeds:
        torch.manual_seed(seed)
        teachers.append(build_model("resnet8", 100))
    return student, teachers


def distiller_for(method, student, teacher, *opts):
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, *opts])
    return build_distiller(cfg, student, teacher, DATA)


def batch(size=6):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.arange(size) % 100


def np_log_softmax(row):
    row = row - row.max()
    return row - math.log(np.exp(row).sum())


def np_kl(p_teacher, log_q_student):
    """KL(p || q) summed over classes, averaged over rows."""
    return float(np.mean([np.sum(p * (np.log(p) - log_q)) for p, log_q in
                          zip(p_teacher, log_q_student)]))


def outputs(distiller, image):
    """Student logits (train mode, as forward_train sees them) and each teacher's, float64."""
    student = distiller.student(image)[0].detach().double().numpy()
    with torch.no_grad():
        teachers = [t(image)[0].double().numpy() for t in distiller.teacher_models()]
    return student, teachers


# ------------------------------------------------------------------- losses

@pytest.mark.parametrize("reduce", ["mean_probs", "mean_loss"])
def test_two_identical_teachers_give_the_single_teacher_kd_loss(reduce):
    student, (teacher,) = models(teacher_seeds=(1,))
    twin = copy.deepcopy(teacher)
    image, target = batch()
    single = distiller_for("KD", student, teacher)
    ensemble = distiller_for("KD", student, [teacher, twin], "DISTILLER.TEACHER_REDUCE", reduce)
    single.train(), ensemble.train()
    _, expected = single(image, target)
    _, losses = ensemble(image, target)
    assert set(losses) == set(expected)
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduce", ["mean_probs", "mean_loss"])
@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_every_logit_method_sees_two_identical_teachers_as_one_or_refuses(method, reduce):
    student, (teacher,) = models(teacher_seeds=(1,))
    if method in STUDENT_FOR:           # DeiT's student has a distillation token
        student = build_model(STUDENT_FOR[method][1], 100, image_size=32, small_input=True)
    image, target = batch()
    # The method's own modules (OFA's branches) start alike in both.
    torch.manual_seed(7)
    single = distiller_for(method, student, teacher)
    try:
        torch.manual_seed(7)
        ensemble = distiller_for(method, student, [teacher, copy.deepcopy(teacher)],
                                 "DISTILLER.TEACHER_REDUCE", reduce)
    except UserError as error:
        # Refused before any step, in one line naming the key; mean_loss serves every
        # logit method without a module of its own.
        assert "\n" not in str(error) and f"DISTILLER.TEACHER_REDUCE {reduce}" in str(error)
        assert reduce == "mean_probs" or single.extra_phases()
        return
    assert len(ensemble.teacher_models()) == 2
    single.train(), ensemble.train()
    # Extra fields of logit methods are further views of the images (MLKD's strong view).
    generator = torch.Generator().manual_seed(4)
    views = {name: torch.randn(image.shape, generator=generator)
             for name in single.extra_batch_fields()}
    torch.manual_seed(5)
    _, expected = single(image, target, **views)
    torch.manual_seed(5)
    _, losses = ensemble(image, target, **views)
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method, opts, fragment", [
    ("CTKD", [], "CTKD reads the teacher's logits otherwise than softened at one fixed"),
    ("MLKD", [], "MLKD reads the teacher's logits at the temperatures 4, 3, 5, 2, 6"),
    ("KD", ["KD.LOGIT_STAND", "True"], "KD reads the teacher's logits otherwise"),
    ("ADVKD", [], "AdvKD reads the teacher's logits otherwise"),
])
def test_mean_probs_is_refused_where_one_temperature_cannot_serve(method, opts, fragment):
    # The review found CTKD's and MLKD's teachers averaged at T=1, then softened again
    # at their own temperatures: silently another loss. Now refused, naming the key.
    student, teachers = models(teacher_seeds=(1, 2))
    with pytest.raises(UserError) as error:
        distiller_for(method, student, teachers, "DISTILLER.TEACHER_REDUCE", "mean_probs", *opts)
    assert str(error.value).startswith("DISTILLER.TEACHER_REDUCE mean_probs")
    assert fragment in str(error.value)


def test_mean_probs_distils_from_the_averaged_softened_predictions():
    student, teachers = models(teacher_seeds=(1, 2, 3))
    with torch.no_grad():                 # teachers that really disagree
        for scale, teacher in zip((1.0, 3.0, -2.0), teachers):
            teacher.fc.weight.mul_(scale * 20)
    image, target = batch()
    distiller = distiller_for("KD", student, teachers, "KD.TEMPERATURE", "3",
                              "KD.LOSS.KD_WEIGHT", "0.7")
    distiller.train()
    _, losses = distiller(image, target)
    s_logits, t_logits = outputs(distiller, image)
    temperature = 3.0
    mean_probs = np.mean([np.exp([np_log_softmax(row / temperature) for row in logits])
                          for logits in t_logits], axis=0)
    log_student = np.array([np_log_softmax(row / temperature) for row in s_logits])
    expected = 0.7 * temperature ** 2 * np_kl(mean_probs, log_student)
    assert losses["loss_kd"].item() == pytest.approx(expected, rel=1e-5)
    # Not the same as averaging the logits, nor as one teacher.
    mean_logit_probs = np.exp([np_log_softmax(row / temperature)
                               for row in np.mean(t_logits, axis=0)])
    assert abs(0.7 * 9 * np_kl(mean_logit_probs, log_student) - expected) > 1e-3 * expected


def test_mean_loss_averages_one_kd_loss_per_teacher_and_runs_the_student_once():
    student, teachers = models(teacher_seeds=(1, 2))
    with torch.no_grad():
        teachers[1].fc.weight.mul_(-30)
    image, target = batch()
    distiller = distiller_for("KD", student, teachers, "DISTILLER.TEACHER_REDUCE", "mean_loss")
    distiller.train()
    tracked = student.bn1.num_batches_tracked.item()
    logits, losses = distiller(image, target)
    assert student.bn1.num_batches_tracked.item() == tracked + 1    # one student forward
    s_logits, t_logits = outputs(distiller, image)
    log_student = np.array([np_log_softmax(row / 4) for row in s_logits])
    per_teacher = [0.9 * 16 * np_kl(np.exp([np_log_softmax(row / 4) for row in logits]),
                                    log_student) for logits in t_logits]
    assert losses["loss_kd"].item() == pytest.approx(np.mean(per_teacher), rel=1e-5)
    assert abs(per_teacher[0] - per_teacher[1]) > 1e-3
    ce = -np.mean([np_log_softmax(row)[t] for row, t in zip(s_logits, target)])
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce, rel=1e-5)
    # One graph: the summed loss back-propagates once into the student.
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for t in teachers for p in t.parameters())


@pytest.mark.parametrize("method", ["AT", "FITNET", "CRD", "RKD"])
def test_methods_without_logits_refuse_several_teachers(method):
    # They used teacher 0 alone while every teacher was loaded, evaluated and logged.
    student, teachers = models(teacher_seeds=(1, 2))
    with pytest.raises(UserError, match=r"^DISTILLER.TEACHERS: \S+ reads the teacher's .* and no "
                                        r"logits.*set DISTILLER.TEACHER"):
        distiller_for(method, student, teachers, "CRD.NCE.K", "16")


def test_a_method_reading_logits_and_maps_gets_the_feature_teachers_maps():
    # DIST+ reads the logits (averaged over the teachers) and the last maps (of one).
    student, teachers = models(teacher_seeds=(1, 2))
    image, _ = batch()
    distiller = distiller_for("DISTPLUS", student, teachers, "DISTILLER.FEATURE_TEACHER", "1")
    assert distiller.teacher is teachers[1]
    logits, feats = distiller.teacher_forward(image)
    with torch.no_grad():
        expected_feats = teachers[1](image)[1]
        stacked = torch.stack([t(image)[0].double() for t in teachers]) / distiller.tau
    expected = distiller.tau * torch.softmax(stacked, dim=-1).mean(0).log()
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(feats["feats"], expected_feats["feats"]))
    with pytest.raises(UserError, match="TEACHER_REDUCE mean_loss.*DISTPlus also reads"):
        distiller_for("DISTPLUS", student, teachers, "DISTILLER.TEACHER_REDUCE", "mean_loss")


# ---------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def second_teacher_file(tmp_path_factory):
    """A resnet8 teacher (another architecture) in mdistiller's layout."""
    folder = tmp_path_factory.mktemp("teachers2")
    torch.manual_seed(4)
    path = folder / "resnet8.pth"
    torch.save({"model": build_model("resnet8", 100).state_dict()}, path)
    return str(path)


def ensemble_opts(teacher_file, second_teacher_file, *extra):
    return ["DISTILLER.TEACHER_WEIGHTS", "", "DISTILLER.TEACHERS", "[resnet20, resnet8]",
            "DISTILLER.TEACHERS_WEIGHTS", f'["{teacher_file}", "{second_teacher_file}"]', *extra]


@pytest.mark.parametrize("reduce", ["mean_probs", "mean_loss"])
def test_teachers_stay_frozen_in_eval_mode_through_two_trainer_steps(
        reduce, cifar_root, teacher_file, second_teacher_file, tmp_path):
    trainer = make_trainer("KD", cifar_root, teacher_file, tmp_path / "run",
                           *ensemble_opts(teacher_file, second_teacher_file,
                                          "DISTILLER.TEACHER_REDUCE", reduce))
    distiller = trainer.distiller
    teachers = distiller.teacher_models()
    assert len(teachers) == 2 and teachers[0] is distiller.teacher
    # Each built as named (resnet20, resnet8) and loaded from its own file.
    for teacher, path in zip(teachers, (teacher_file, second_teacher_file)):
        saved = torch.load(path, weights_only=True)["model"]
        assert saved.keys() == teacher.state_dict().keys()
        assert all(torch.equal(saved[key], value) for key, value in teacher.state_dict().items())
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    values = two_steps(trainer)
    assert all(v is not None for v in values)
    for teacher, state in zip(teachers, before):
        assert not teacher.training
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(state[key], value) for key, value in teacher.state_dict().items())
    assert distiller.student.training
    # No teacher in the optimizer, the checkpoint or DDP's synchronisation: the
    # teachers are not submodules of the distiller at all.
    owned = {id(t) for t in [*distiller.parameters(), *distiller.buffers()]}
    assert not any(id(t) in owned for teacher in teachers
                   for t in [*teacher.parameters(), *teacher.buffers()])
    assert len(distiller.state_dict_to_save()) == len(distiller.student.state_dict())
    # A run checkpoint loads into a fresh ensemble run.
    trainer.save(epoch_complete=False)
    fresh = make_trainer("KD", cifar_root, teacher_file, tmp_path / "fresh",
                         *ensemble_opts(teacher_file, second_teacher_file,
                                        "DISTILLER.TEACHER_REDUCE", reduce))
    fresh.load_state_dict(torch.load(tmp_path / "run" / "latest", weights_only=True))
    assert fresh.global_step == 2


# ------------------------------------------------------------------ mistakes

def build_with(cifar_root, tmp_path, *opts):
    cfg = load_cfg(CONFIG, tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "KD",
                                     "DISTILLER.STUDENT", "resnet8", *opts))
    return build_experiment(cfg)


@pytest.mark.parametrize("weights, fragments", [
    (lambda good, other: [good, "missing/ckpt.pth"],
     ["teacher 1 (resnet8) of DISTILLER.TEACHERS", "missing/ckpt.pth not found",
      "DISTILLER.TEACHERS_WEIGHTS[1]"]),
    (lambda good, other: [other, other],         # resnet8 weights for the resnet20
     ["teacher 0 (resnet20) of DISTILLER.TEACHERS", "does not hold resnet20 weights"]),
])
def test_a_teacher_weights_mistake_names_the_teacher(weights, fragments, cifar_root, teacher_file,
                                                     second_teacher_file, tmp_path):
    paths = weights(teacher_file, second_teacher_file)
    with pytest.raises(UserError) as error:
        build_with(cifar_root, tmp_path, "DISTILLER.TEACHERS", "[resnet20, resnet8]",
                   "DISTILLER.TEACHERS_WEIGHTS", f'["{paths[0]}", "{paths[1]}"]')
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize("opts, fragment", [
    (["DISTILLER.TEACHERS", "[resnet_9, resnet20]"], "teacher 0 (resnet_9) of DISTILLER.TEACHERS"),
    (["DISTILLER.TEACHERS", "[resnet20, resnet8]", "DISTILLER.TEACHERS_WEIGHTS", "[a.pth]"],
     "one path per teacher"),
    (["DISTILLER.TEACHERS", "[resnet20, resnet8]", "DISTILLER.TEACHER_WEIGHTS", "a.pth"],
     "DISTILLER.TEACHER_WEIGHTS is the single teacher's checkpoint"),
    (["DISTILLER.TEACHERS", "[resnet20, resnet8]", "DISTILLER.FEATURE_TEACHER", "2"],
     "DISTILLER.FEATURE_TEACHER 2 is not an index"),
    (["DISTILLER.TEACHERS_WEIGHTS", "[a.pth]"], "DISTILLER.TEACHERS is empty"),
])
def test_ensemble_config_mistakes(opts, fragment, cifar_root, tmp_path):
    with pytest.raises(UserError) as error:
        build_with(cifar_root, tmp_path, *opts)
    assert fragment in str(error.value)


def test_teacher_reduce_is_a_choice():
    with pytest.raises(UserError, match="DISTILLER.TEACHER_REDUCE.*mean_loss, mean_probs"):
        load_cfg(None, ["DISTILLER.TEACHER_REDUCE", "mean_logits"])


def test_the_example_config_names_an_ensemble():
    cfg = load_cfg(os.path.join(os.path.dirname(CONFIG), "kd_ensemble.yaml"))
    assert len(cfg.DISTILLER.TEACHERS) >= 2 and cfg.DISTILLER.TYPE == "KD"
