"""The step protocol: the trainer owns every backward, optimizer step and state commit.

DOT against a hand-written two-momentum SGD, a skipped (non-finite) step that
leaves everything as it was, and forward_train writing nothing, for every method.
"""
import ast
import copy
import math
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from mdistill.distillers import DISTILLERS, Distiller
from mdistill.engine.update_rules import UPDATE_RULES, DOTOptimizer
from mdistill.errors import UserError
from test_distillers import make_trainer


class Solver:
    """The SOLVER keys an update rule reads."""
    TYPE, TRAINER, LR, MOMENTUM, WEIGHT_DECAY, AMP = "SGD", "dot", 0.1, 0.9, 0.01, "none"

    class DOT:
        DELTA = 0.075


def toy_losses(a, b, c, x):
    """``a`` gets both gradients, ``b`` only the task's, ``c`` only the distillation's."""
    return {"loss_ce": ((a * x).sum() + b * b).pow(2),
            "loss_kd": (a.pow(3).sum() - c) ** 2 + (c * x).sum()}


def hand_dot(values, xs, lr, momentum, delta, decay):
    """DOT written from its definition, in float64, on the toy problem.

    Task gradient g, distillation gradient k, m_t = m - delta, m_k = m + delta,
    m_mean = m: a parameter with both gradients uses m_t and m_k with weight decay
    on the task side only; one with a single gradient uses m_mean with weight decay
    on that gradient; the first step of a buffer is the gradient itself (the
    distillation buffer's first value without weight decay).
    """
    a, b, c = (np.array(v, dtype=np.float64) for v in values)
    m_t, m_k, m_mean = momentum - delta, momentum + delta, momentum
    buffers = {}
    for x in xs:
        x = np.array(x, dtype=np.float64)
        s = (a * x).sum() + b * b
        r = (a ** 3).sum() - c
        task = {"a": 2 * s * x, "b": 2 * s * 2 * b}
        kd = {"a": 2 * r * 3 * a ** 2, "c": -2 * r + x.sum()}
        params = {"a": a, "b": b, "c": c}
        new = dict(params)
        for name, grad in task.items():       # task updates first, with weight decay
            d = grad + decay * params[name]
            if ("t", name) not in buffers:
                buffers[("t", name)] = d
            else:
                m = m_t if name in kd else m_mean
                buffers[("t", name)] = m * buffers[("t", name)] + d
            new[name] = new[name] - lr * buffers[("t", name)]
        for name, grad in kd.items():
            if ("k", name) not in buffers:
                buffers[("k", name)] = grad
            elif name in task:
                buffers[("k", name)] = m_k * buffers[("k", name)] + grad
            else:
                buffers[("k", name)] = (m_mean * buffers[("k", name)]
                                        + grad + decay * new[name])
            new[name] = new[name] - lr * buffers[("k", name)]
        a, b, c = new["a"], new["b"], new["c"]
    return a, b, c


def run_rule(rule_name, values, xs, scaler=None):
    a, b, c = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values)
    solver = Solver()
    solver.TRAINER = rule_name
    rule = UPDATE_RULES.get(rule_name)(solver)
    optimizer = rule.build_optimizer([a, b, c])
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    for x in xs:
        optimizer.zero_grad(set_to_none=True)
        rule.backward_and_step(toy_losses(a, b, c, torch.tensor(x, dtype=torch.float64)),
                               optimizer, scaler)
    return a.detach().numpy(), b.item(), c.item(), optimizer


VALUES = ([0.3, -0.2], 0.5, 0.7)
XS = ([1.0, 2.0], [-0.5, 0.25], [0.3, 0.1])


def test_dot_rule_equals_a_hand_written_two_momentum_sgd():
    a, b, c, optimizer = run_rule("dot", VALUES, XS)
    expected = hand_dot(VALUES, XS, Solver.LR, Solver.MOMENTUM, Solver.DOT.DELTA,
                        Solver.WEIGHT_DECAY)
    np.testing.assert_allclose(a, expected[0], rtol=1e-10)
    assert b == pytest.approx(float(expected[1]), rel=1e-10)
    assert c == pytest.approx(float(expected[2]), rel=1e-10)
    assert isinstance(optimizer, DOTOptimizer)
    group = optimizer.param_groups[0]
    assert group["momentum"] == pytest.approx(0.825) and group["momentum_kd"] == pytest.approx(0.975)
    # Both buffers live in the optimizer state, so a checkpoint carries them.
    state = optimizer.state_dict()["state"]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(state[0])
    assert set(state[1]) == {"momentum_buffer"} and set(state[2]) == {"momentum_kd_buffer"}


def test_dot_differs_from_base_and_crd_dot_is_dot():
    dot = run_rule("dot", VALUES, XS)
    assert run_rule("crd_dot", VALUES, XS)[2] == dot[2]
    solver = Solver()
    solver.TRAINER, solver.MOMENTUM = "base", 0.9
    assert UPDATE_RULES.get("crd") is UPDATE_RULES.get("base")
    a, b, c = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in VALUES)
    rule = UPDATE_RULES.get("base")(solver)
    optimizer = rule.build_optimizer([a, b, c])
    for x in XS:
        optimizer.zero_grad()
        rule.backward_and_step(toy_losses(a, b, c, torch.tensor(x, dtype=torch.float64)),
                               optimizer, torch.amp.GradScaler("cpu", enabled=False))
    assert not np.allclose(a.detach().numpy(), dot[0])


def test_dot_with_a_gradient_scaler_unscales_both_gradients():
    # fp16's scaler multiplies both losses; each gradient must be unscaled before it
    # enters a momentum buffer, so the result equals the unscaled rule.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    a, b, c, _ = run_rule("dot", VALUES, XS, scaler=scaler)
    expected = hand_dot(VALUES, XS, Solver.LR, Solver.MOMENTUM, Solver.DOT.DELTA,
                        Solver.WEIGHT_DECAY)
    np.testing.assert_allclose(a, expected[0], rtol=1e-9)
    assert c == pytest.approx(float(expected[2]), rel=1e-9)
    assert scaler.get_scale() == 1024.0


def test_dot_skips_the_whole_step_when_the_distillation_gradient_overflows():
    a, b, c = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in VALUES)
    solver = Solver()
    rule = UPDATE_RULES.get("dot")(solver)
    optimizer = rule.build_optimizer([a, b, c])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.tensor(XS[0], dtype=torch.float64)
    losses = toy_losses(a, b, c, x)
    losses["loss_kd"] = losses["loss_kd"] * torch.tensor(float("inf"), dtype=torch.float64) * c
    before = [p.detach().clone() for p in (a, b, c)]
    rule.backward_and_step(losses, optimizer, scaler)
    assert all(torch.equal(p, q) for p, q in zip((a, b, c), before))     # nothing moved
    assert optimizer.state_dict()["state"] == {}                         # no buffer written
    assert scaler.get_scale() == 512.0                                   # the scale backed off


def test_dot_needs_sgd_and_a_task_loss():
    solver = Solver()
    solver.TYPE = "Adam"
    with pytest.raises(UserError, match="SOLVER.TYPE Adam cannot be used"):
        UPDATE_RULES.get("dot")(solver)
    rule = UPDATE_RULES.get("dot")(Solver())
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(UserError, match="needs the task loss 'loss_ce'.*loss_kd"):
        rule.backward_and_step({"loss_kd": p.sum()}, rule.build_optimizer([p]),
                               torch.amp.GradScaler("cpu", enabled=False))


def test_unknown_trainer_or_solver_fails_before_the_run_starts(cifar_root, teacher_file,
                                                               tmp_path):
    with pytest.raises(UserError, match="SOLVER.TRAINER.*'dott'") as error:
        make_trainer("KD", cifar_root, teacher_file, tmp_path / "a", "SOLVER.TRAINER", "dott")
    assert all(name in str(error.value) for name in ("base", "crd", "crd_dot", "dot"))
    with pytest.raises(UserError, match="SOLVER.TYPE AdamW cannot be used"):
        make_trainer("KD", cifar_root, teacher_file, tmp_path / "b", "SOLVER.TRAINER", "dot",
                     "SOLVER.TYPE", "AdamW")


@pytest.mark.parametrize("method,trainer", [("KD", "dot"), ("CRD", "crd_dot")])
def test_dot_trains_through_the_trainer(method, trainer, cifar_root, teacher_file, tmp_path):
    run = make_trainer(method, cifar_root, teacher_file, tmp_path, "SOLVER.TRAINER", trainer)
    assert isinstance(run.optimizer, DOTOptimizer)
    run.distiller.train()
    run.distiller.on_epoch_start(1)
    run.train_loader.set_epoch(1)
    for _, batch in zip(range(2), run.train_loader):
        values = run.run_step(batch)
        assert values is not None and all(map(math.isfinite, values.values()))
    state = run.optimizer.state_dict()["state"]
    assert any("momentum_kd_buffer" in entry for entry in state.values())


# ----------------------------------------------------------- skipped steps
def full_state(trainer):
    """Every piece of state a step may touch."""
    state = {"model": copy.deepcopy(trainer.distiller.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
             "aux": copy.deepcopy({name: opt.state_dict()
                                   for name, opt in trainer.aux_optimizers.items()}),
             "scaler": copy.deepcopy(trainer.scaler.state_dict())}
    return state


def assert_same(before, after, path=""):
    if isinstance(before, dict):
        assert before.keys() == after.keys(), path
        for key in before:
            assert_same(before[key], after[key], f"{path}/{key}")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), path
        for i, (x, y) in enumerate(zip(before, after)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(before):
        assert torch.equal(before, after), path
    else:
        assert before == after, path


@pytest.mark.parametrize("method", ["KD", "CRD", "ADVKD"])
def test_a_skipped_nonfinite_step_leaves_everything_as_it_was(method, cifar_root, teacher_file,
                                                             tmp_path):
    trainer = make_trainer(method, cifar_root, teacher_file, tmp_path,
                           "SOLVER.SKIP_NONFINITE_STEPS", "3")
    distiller = trainer.distiller
    distiller.train()
    distiller.on_epoch_start(1)
    trainer.train_loader.set_epoch(1)
    batches = iter(trainer.train_loader)
    assert trainer.run_step(next(batches)) is not None      # optimizer state, Z, memory exist
    before = full_state(trainer)
    real_forward = distiller.forward_train

    def poisoned(image, target, **batch):
        logits, losses = real_forward(image, target, **batch)    # BN statistics move here
        name = next(iter(losses))
        return logits, {**losses, name: losses[name] * float("nan")}

    distiller.forward_train = poisoned
    assert trainer.run_step(next(batches)) is None
    assert trainer.skipped_steps == 1 and trainer.global_step == 1
    assert_same(before, full_state(trainer))
    assert distiller.stashed == {}
    # Without the poison, the same trainer takes the next step normally.
    distiller.forward_train = real_forward
    assert trainer.run_step(next(batches)) is not None
    changed = trainer.distiller.state_dict()
    assert not torch.equal(changed["student.fc.weight"], before["model"]["student.fc.weight"])


# ----------------------------------------------------- forward computes only
def is_running_statistic(name):
    return re.search(r"(running_mean|running_var|num_batches_tracked)$", name) is not None


@pytest.mark.parametrize("method", DISTILLERS.names())
def test_forward_train_writes_no_state(method, cifar_root, teacher_file, tmp_path):
    trainer = make_trainer(method, cifar_root, teacher_file, tmp_path)
    distiller = trainer.distiller
    distiller.train()
    distiller.on_epoch_start(1)
    trainer.train_loader.set_epoch(1)
    batches = iter(trainer.train_loader)
    trainer.run_step(next(batches))                 # past any first-step initialisation
    before = {name: value.clone() for name, value in distiller.state_dict().items()
              if not is_running_statistic(name)}
    optimizers = full_state(trainer)
    batch = next(batches)
    distiller.forward_train(batch["image"], batch["target"],
                            **{k: v for k, v in batch.items() if k not in ("image", "target")})
    after = distiller.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"{method}.forward_train wrote {changed[:5]}"
    assert_same(optimizers["optimizer"], trainer.optimizer.state_dict())
    assert_same(optimizers["aux"], {name: opt.state_dict()
                                    for name, opt in trainer.aux_optimizers.items()})


def test_warmup_factor_is_mdistillers_one_based_ramp():
    distiller = Distiller(nn.Linear(2, 2))
    observed = []
    for epoch in (1, 10, 20, 30):
        distiller.on_epoch_start(epoch)
        observed.append(distiller.warmup_factor(20))
    assert observed == [0.05, 0.5, 1.0, 1.0]
    assert distiller.warmup_factor(0) == 1.0


def code_strings(path):
    """The string constants of a Python file's code (docstrings left out)."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_engine_names_no_method():
    names = set(DISTILLERS.names()) - {"NONE"}
    engine = os.path.join(ROOT, "mdistill", "engine")
    for file in sorted(os.listdir(engine)):
        if file.endswith(".py"):
            named = names & set(code_strings(os.path.join(engine, file)))
            assert not named, f"engine/{file} names {sorted(named)}"
