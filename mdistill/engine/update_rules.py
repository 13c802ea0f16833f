"""Update rules: how the trainer turns one step's losses into parameter updates.

SOLVER.TRAINER names the rule (mdistiller's key and values):

* ``base``: one backward of the summed losses, one optimizer step;
* ``crd``: mdistiller's trainer for CRD; here the same as ``base``, since CRD
  declares what it needs (extra batch fields, :meth:`after_step`);
* ``dot``: Zhao et al.'s Distillation-Oriented Trainer ("DOT: A
  Distillation-Oriented Trainer", ICCV 2023): the task loss ``loss_ce`` and
  the distillation losses (all the others) are back-propagated separately,
  and SGD keeps one momentum buffer per gradient, MOMENTUM - DOT.DELTA for the
  task's and MOMENTUM + DOT.DELTA for the distillation's;
* ``crd_dot``: DOT with CRD; the same as ``dot`` here.

A rule only back-propagates and steps: the trainer has already checked that
the losses are finite, and runs the method's extra phases and state commits
afterwards (:func:`run_extra_phases`, :func:`commit_step`).
"""
import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..registry import Registry
from ..utils.dist import average_gradients

UPDATE_RULES = Registry("update rule (SOLVER.TRAINER)")
TASK_LOSS = "loss_ce"


def build_optimizer(solver, params):
    """The optimizer named by SOLVER.TYPE over ``params``.

    On CUDA without fp16 the fused implementation is used: one kernel for all
    parameters instead of several per tensor, which matters for small CIFAR
    models whose steps are bound by kernel launches. (With fp16's gradient
    scaler the fused step diverged on an H100, so the scaler keeps the
    standard implementation.)

    With SOLVER.NO_DECAY_NORM_BIAS the parameters are split into two groups,
    see :func:`decay_groups`.
    """
    params = list(params)
    fused = (bool(params) and all(param.is_cuda for param in params)
             and solver.AMP != "fp16")
    groups = decay_groups(solver, params)
    if solver.TYPE == "SGD":
        return torch.optim.SGD(groups, lr=solver.LR, momentum=solver.MOMENTUM,
                               weight_decay=solver.WEIGHT_DECAY, fused=fused or None)
    optimizer = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[solver.TYPE]
    return optimizer(groups, lr=solver.LR, weight_decay=solver.WEIGHT_DECAY, fused=fused or None)


def recipe_option(solver, key):
    """SOLVER.<key> of the modern recipe, off (0/False) for a stand-in solver
    object written before the key existed (tests' and tools' minimal ones)."""
    return getattr(solver, key, 0)


def decay_groups(solver, params):
    """``params`` as given, or with SOLVER.NO_DECAY_NORM_BIAS timm's two groups
    (``timm.optim.param_groups_weight_decay``): no weight decay on 1-d parameters
    (normalisation layers' weights and biases, every bias), SOLVER.WEIGHT_DECAY on
    the others. A stage hands the optimizer bare parameters, whose 1-d ones are
    exactly those timm's rule leaves out by name or by shape."""
    if not recipe_option(solver, "NO_DECAY_NORM_BIAS"):
        return params
    from timm.optim import param_groups_weight_decay

    class Named:
        # timm reads named_parameters(); positions stand in for the names.
        def named_parameters(self):
            return ((str(index), param) for index, param in enumerate(params))
    groups = param_groups_weight_decay(Named(), solver.WEIGHT_DECAY)
    return groups or params


@UPDATE_RULES.register("base")
class BaseRule:
    """One backward of the summed losses, then one (scaled) optimizer step."""

    def __init__(self, solver):
        self.solver = solver

    def build_optimizer(self, params):
        return build_optimizer(self.solver, params)

    def forward_context(self, model):
        """The context of the training forward (DOT turns DDP's own sync off)."""
        return contextlib.nullcontext()

    def backward_and_step(self, losses, optimizer, scaler):
        """Back-propagate ``losses`` (``{name: scalar}``) and step ``optimizer``.

        Returns:
            Whether the step was taken: False when fp16's GradScaler found an
            overflow and skipped it (the trainer then commits nothing of the step).
        """
        scaler.scale(sum(losses.values())).backward()
        clip_gradients(self.solver, optimizer, scaler)
        return scaled_step(optimizer, scaler)


def clip_gradients(solver, optimizer, scaler):
    """Clip the global norm of ``optimizer``'s gradients to SOLVER.CLIP_GRAD (0: off).

    Under fp16's scaler the gradients are unscaled first (``scaler.unscale_``,
    torch's documented order), so the threshold is in true gradient units; a
    gradient that overflowed stays non-finite and the scaler skips the step.
    """
    if recipe_option(solver, "CLIP_GRAD") <= 0:
        return
    scaler.unscale_(optimizer)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, solver.CLIP_GRAD)


def scaled_step(optimizer, scaler):
    """``scaler.step(optimizer)`` and ``scaler.update()``; whether the step was taken.

    The scaler skips a step whose gradients overflowed and then lowers its scale
    (and only then): a lower scale after the update means the step was skipped.
    Without fp16 the scaler is disabled and every step is taken (the trainer has
    already checked that the losses are finite).
    """
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


UPDATE_RULES.register("crd", BaseRule)


class DOTOptimizer(torch.optim.Optimizer):
    """SGD with one momentum buffer for the task gradient and one for the
    distillation gradient, as mdistiller's ``DistillationOrientedTrainer``.

    Before :meth:`step`, the trainer back-propagates the distillation loss and
    hands its gradients to :meth:`set_distillation_grads`, then back-propagates
    the task loss into ``.grad``. :meth:`step` then applies, per parameter
    ``p`` with task gradient ``g`` and distillation gradient ``k``:

    * task: ``d = g + wd p``; the buffer starts at ``d``, then
      ``b = m b + d`` when ``p`` also has a distillation gradient, else
      ``b = (m + m_kd) / 2 b + d``; ``p -= lr b``;
    * distillation: the buffer starts at ``k`` (no weight decay), then
      ``b_kd = m_kd b_kd + k`` when ``p`` also has a task gradient, else
      ``b_kd = (m + m_kd) / 2 b_kd + (k + wd p)``; ``p -= lr b_kd``.

    A parameter's weight decay is thus applied once (with the task gradient
    when it has one), and one that sees only one of the two gradients keeps
    the mean momentum. Buffers live in the optimizer state (checkpointed).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: the task gradient's momentum (MOMENTUM - DELTA).
        momentum_kd: the distillation gradient's momentum (MOMENTUM + DELTA).
        weight_decay: L2 penalty.
    """

    def __init__(self, params, lr, momentum, momentum_kd, weight_decay=0.0):
        if min(lr, momentum, momentum_kd, weight_decay) < 0:
            raise ValueError("DOT needs a non-negative lr, momenta and weight decay")
        super().__init__(params, dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd,
                                      weight_decay=weight_decay))
        self._distillation_grads = {}

    def set_distillation_grads(self, grads):
        """``{parameter: unscaled distillation gradient}`` for the next :meth:`step`."""
        self._distillation_grads = grads

    @torch.no_grad()
    def step(self, closure=None):
        kd_grads, self._distillation_grads = self._distillation_grads, {}
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            momentum, momentum_kd = group["momentum"], group["momentum_kd"]
            mean_momentum = (momentum + momentum_kd) / 2
            for param in group["params"]:
                grad, kd_grad = param.grad, kd_grads.get(param)
                state = self.state[param]
                if grad is not None:
                    update = grad.add(param, alpha=decay) if decay else grad
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = update.clone()
                    else:
                        buffer.mul_(momentum if kd_grad is not None else mean_momentum)
                        buffer.add_(update)
                    param.add_(buffer, alpha=-lr)
                if kd_grad is not None:
                    buffer = state.get("momentum_kd_buffer")
                    if buffer is None:
                        buffer = state["momentum_kd_buffer"] = kd_grad.clone()
                    elif grad is not None:
                        buffer.mul_(momentum_kd).add_(kd_grad)
                    else:
                        update = kd_grad.add(param, alpha=decay) if decay else kd_grad
                        buffer.mul_(mean_momentum).add_(update)
                    param.add_(buffer, alpha=-lr)


@UPDATE_RULES.register("dot")
class DOTRule(BaseRule):
    """Two backward passes (distillation, then task) and :class:`DOTOptimizer`.

    With fp16's GradScaler each gradient is unscaled before it reaches a
    momentum buffer, and an overflow in either skips the whole step (the
    scaler then lowers its scale as for any overflow). Under
    DistributedDataParallel the forward runs without DDP's gradient hooks
    (two backward passes through one forward are not what DDP expects) and
    each gradient is averaged over processes here.
    """

    def __init__(self, solver):
        super().__init__(solver)
        if solver.TYPE != "SGD":
            raise UserError(f"SOLVER.TRAINER {solver.TRAINER} (DOT) is an SGD variant; "
                            f"SOLVER.TYPE {solver.TYPE} cannot be used with it (use SGD)")
        if recipe_option(solver, "CLIP_GRAD") > 0:
            # DOT keeps two gradients with their own momenta: clipping their sum,
            # or each alone, would be a trainer of our own, not DOT; so refuse.
            raise UserError(f"SOLVER.CLIP_GRAD {solver.CLIP_GRAD} cannot be used with "
                            f"SOLVER.TRAINER {solver.TRAINER} (DOT keeps two gradients with "
                            f"their own momenta); set SOLVER.CLIP_GRAD 0 or SOLVER.TRAINER base")

    def build_optimizer(self, params):
        solver = self.solver
        return DOTOptimizer(decay_groups(solver, list(params)), lr=solver.LR, momentum=solver.MOMENTUM - solver.DOT.DELTA,
                            momentum_kd=solver.MOMENTUM + solver.DOT.DELTA,
                            weight_decay=solver.WEIGHT_DECAY)

    def forward_context(self, model):
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward_and_step(self, losses, optimizer, scaler):
        if TASK_LOSS not in losses:
            raise UserError(f"SOLVER.TRAINER {self.solver.TRAINER} needs the task loss "
                            f"{TASK_LOSS!r} among the method's losses; it returned "
                            f"{', '.join(losses)}")
        params = [param for group in optimizer.param_groups for param in group["params"]]
        distillation = [value for name, value in losses.items() if name != TASK_LOSS]
        kd_grads, kd_overflow = {}, None
        if distillation:
            scaler.scale(sum(distillation)).backward(retain_graph=True)
            average_gradients(params)
            kd_grads = {param: param.grad for param in params if param.grad is not None}
            if scaler.is_enabled() and kd_grads:
                grads = list(kd_grads.values())
                torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
                kd_overflow = torch.stack([grad.sum() for grad in grads]).sum().isfinite().logical_not()
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses[TASK_LOSS]).backward()
        average_gradients(params)
        if kd_overflow is not None:
            # An overflow in the distillation gradient must skip the step too: make a
            # task gradient infinite (a whole-tensor add, whatever its memory format),
            # so that the scaler skips the step and lowers its scale as for any overflow.
            grad = next(param.grad for param in params if param.grad is not None)
            grad.add_(torch.where(kd_overflow, float("inf"), 0.0).to(grad.dtype))
        optimizer.set_distillation_grads(kd_grads)
        try:
            return scaled_step(optimizer, scaler)
        finally:
            optimizer.set_distillation_grads({})


UPDATE_RULES.register("crd_dot", DOTRule)


def run_extra_phases(distiller):
    """Run the method's :meth:`~mdistill.distillers.Distiller.extra_phases` (fp32,
    gradients averaged over processes), after the student's update."""
    for phase in distiller.extra_phases():
        params = [param for group in phase.optimizer.param_groups for param in group["params"]]
        for _ in range(phase.steps):
            phase.optimizer.zero_grad(set_to_none=True)
            phase.loss().backward()
            average_gradients(params)
            phase.optimizer.step()


def commit_step(distiller):
    """An accepted step's end: the extra phases, then the method's state commits."""
    run_extra_phases(distiller)
    distiller.after_step()
    distiller.clear_stash()
