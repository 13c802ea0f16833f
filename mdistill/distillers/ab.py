"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons" (AAAI 2019), as RepDistiller benchmarks it
(HobbitLong/RepDistiller ``distiller_zoo/AB.py``, ``models/util.py``,
``helper/pretrain.py``, ``train_student.py``).

RepDistiller trains AB in two stages: an initialisation of ``--init_epochs``
30 epochs in which a connector per stage and the student's feature modules
learn to put the student's pre-ReLU stage outputs on the same side of zero
as the teacher's, at SOLVER.LR held constant; then the usual epochs on the
cross-entropy alone (the connector, in eval mode, is no longer used).

RepDistiller's ``init`` puts the whole student in eval mode and then its
feature modules (``get_feat_modules()``: the stem and the stages, up to the
last stage map) back in train mode, and optimises only those and the
connectors. What lies after the last stage map stays in eval mode and
untrained: the classifier, MobileNetV2's head convolution, and WRN's final
``bn1``, whose output is the last pre-activation map, which the boundary loss
therefore sees normalised with running statistics. Here the feature modules
are the student's top-level children with a parameter on the autograd path to
``feats[-1]``, found once by a probe; the others form :attr:`AB.student_head`.
"""
import weakref

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, Stage
from .fitnet import Regressor


class ConvBN(Regressor):
    """FitNet's regressor without the ReLU (RepDistiller's ``ConvReg(use_relu=False)``)."""

    def forward(self, x):
        return self.bn(self.conv(x))


def connector(student_shape, teacher_shape):
    """Identity when channels and height agree, else a conv + BN to the teacher's shape."""
    if student_shape[:2] == teacher_shape[:2]:
        return nn.Identity()
    try:
        return ConvBN(student_shape, teacher_shape)
    except UserError:
        raise UserError(f"AB cannot map a student stage of shape {tuple(student_shape)} to the "
                        f"teacher's {tuple(teacher_shape)}") from None


def activation_boundary_loss(student_maps, teacher_maps, margin=1.0):
    """RepDistiller's AB loss over the stages, in fp32.

    Per stage: ``sum((s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0])``
    over every element, times ``2^(i - n + 1)`` (the last stage weighs 1, each
    earlier one half the next), divided by the batch size and by 1000 / 3.
    """
    count = len(student_maps)
    total = 0.0
    for index, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
        student, teacher = student.float(), teacher.float()
        below = ((student > -margin) & (teacher <= 0)).float()
        above = ((student <= margin) & (teacher > 0)).float()
        loss = ((student + margin).pow(2) * below + (student - margin).pow(2) * above).sum()
        total = total + 2.0 ** (index - count + 1) * loss / student.shape[0] / 1000 * 3
    return total


class ModuleGroup:
    """Submodules of a model named by their attribute names, as one thing with
    ``eval()`` and ``parameters()`` (what :attr:`Stage.eval_modules` and
    :attr:`Stage.parameters` need).

    The names are resolved at each call, so a child replaced after construction
    (the SyncBatchNorm conversion replaces BatchNorms in place) is the one reached.

    Args:
        model: the model (held by a weak reference).
        names: names of its top-level children.
    """

    def __init__(self, model, names):
        self._model = weakref.ref(model)
        self.names = tuple(names)

    def modules(self):
        """The named children, as the model holds them now."""
        model = self._model()
        return [getattr(model, name) for name in self.names]

    def eval(self):
        for module in self.modules():
            module.eval()
        return self

    def parameters(self):
        return [param for module in self.modules() for param in module.parameters()]


def feature_children(model, image_shape):
    """Names of the top-level children of ``model`` with a parameter on the autograd
    path to its last stage map ``feats[-1]`` (RepDistiller's ``get_feat_modules()``),
    found by one forward on zeros in eval mode (BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    try:
        children = [(name, [p for p in child.parameters() if p.requires_grad])
                    for name, child in model.named_children()]
        params = [p for _, child_params in children for p in child_params]
        if not params:
            return []
        with torch.enable_grad():
            _, feats = model(torch.zeros(2, *image_shape, device=params[0].device))
            grads = torch.autograd.grad(feats["feats"][-1].sum(), params, allow_unused=True)
    finally:
        model.train(was_training)
    reached = {id(p) for p, grad in zip(params, grads) if grad is not None}
    return [name for name, child_params in children
            if any(id(p) in reached for p in child_params)]


@DISTILLERS.register("AB")
class AB(Distiller):
    """RepDistiller's AB: an activation-boundary initialisation, then cross-entropy training.

    Stages: ``init`` (``init_epochs``, the student's feature modules and the
    connectors, constant SOLVER.LR, loss ``loss_ab`` on ``preact_feats[1:]``, the
    stages' pre-ReLU outputs; the rest of the student, :attr:`student_head`, in
    eval mode and untrained), then ``distill`` (SOLVER.EPOCHS, the student only,
    ``loss_ce``).

    Args:
        student, teacher: the models.
        init_epochs: length of the initialisation (0 skips it).
        margin: the margin ``m`` of the boundary loss.
        ce_weight: weight of the cross-entropy.
        image_shape: input shape used to probe the feature shapes.
    """

    teacher_reads = frozenset({"preact_feats"})
    student_reads = frozenset({"logits", "feats", "preact_feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, init_epochs=30, margin=1.0, ce_weight=1.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_maps, teacher_maps = student_feats["preact_feats"][1:], teacher_feats["preact_feats"][1:]
        if len(student_maps) != len(teacher_maps):
            raise UserError(f"AB pairs the stages of student and teacher, but the student has "
                            f"{len(student_maps)} and the teacher {len(teacher_maps)}")
        self.connectors = nn.ModuleList(connector(tuple(s.shape[1:]), tuple(t.shape[1:]))
                                        for s, t in zip(student_maps, teacher_maps))
        self.connectors.to(student_maps[0].device)
        features = feature_children(student, image_shape)
        #: RepDistiller's feature modules of the student, trained in the init stage.
        self.student_features = ModuleGroup(student, features)
        #: The rest of the student, in eval mode and untrained in the init stage.
        self.student_head = ModuleGroup(student, [name for name, _ in student.named_children()
                                                  if name not in features])
        self.init_epochs = init_epochs
        self.margin = margin
        self.ce_weight = ce_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, init_epochs=cfg.AB.INIT_EPOCHS, margin=cfg.AB.MARGIN,
                   ce_weight=cfg.AB.LOSS.CE_WEIGHT, image_shape=(3, size, size))

    def stages(self, epochs):
        init = ([Stage("init", self.init_epochs, schedule=False,
                      parameters=lambda: (self.student_features.parameters()
                                          + list(self.connectors.parameters())),
                      eval_modules=("student_head",), task_loss=False)]
                if self.init_epochs > 0 else [])
        return init + [Stage("distill", epochs, parameters=lambda: list(self.student.parameters()),
                             eval_modules=("connectors",))]

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        if self.stage == "init":
            _, teacher_feats = self.teacher_forward(image)
            mapped = [c(f) for c, f in zip(self.connectors, feats["preact_feats"][1:])]
            loss = activation_boundary_loss(mapped, teacher_feats["preact_feats"][1:], self.margin)
            return logits, {"loss_ab": loss}
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
