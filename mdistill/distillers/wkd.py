"""WKD: Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for
Knowledge Distillation" (NeurIPS 2024).

Facts from the authors' code (JiamingLv/WKD ``mdistiller/distillers/WKD.py``,
``mdistiller/engine/cfg.py``, ``configs/``):

* WKD-L: NKD's target term ``-mean_i t_y log s_y`` (softmax at 1, unweighted)
  plus ``LOGIT_WEIGHT`` times the discrete Wasserstein distance between the
  student's and the teacher's distributions over the non-target classes at
  temperature T, with a class-to-class cost (``relu(C) + 1e-8``, the target
  class's row and column left out), solved by ``ITER`` Sinkhorn iterations with
  kernel ``exp(-C / LAMBDA)`` from ``u = 1 / (classes - 1)``, the student's
  distribution on the rows; the distance is ``sum flow * C``, averaged over the
  batch, with no ``T^2``. The cost ``C`` optionally becomes ``1 - exp(-s C)``.
* WKD-F: the student's map (``HINT_LAYER``) through a conv-BN-ReLU projector to
  the teacher's shape; on a ``SPATIAL_GRID`` grid of cells, the per-channel mean
  and standard deviation ``sqrt(unbiased var + EPS)`` of both maps; the loss is
  ``MEAN_COV_RATIO * |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2`` summed, divided by
  ``grid^2 x batch``: the 2-Wasserstein distance of diagonal Gaussians.
* Both weights decay by cosine from ``COSINE_DECAY_EPOCH`` to the last epoch.

The cost is ours to compute: the authors ship linear-CKA matrices of the
teacher's features over the training set for their published configs, and
offer ``fc``, ``1 - cosine similarity`` of the teacher's classifier rows, which
is what :func:`teacher_cost_matrix` computes (once per teacher, kept beside its
checkpoint under the teacher's fingerprint).
"""
import math
import os

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, probe_features
from .fitnet import Regressor
from .sdd import find_classifier, model_label

#: WKD.COST_MATRIX values mdistill computes.
COST_MATRICES = ("fc",)


def classifier_cost(weight):
    """``1 - cosine similarity`` between the rows of a ``[classes, C]`` classifier weight."""
    rows = F.normalize(weight.detach().float(), dim=1)
    return 1.0 - rows @ rows.t()


def cost_file(weights_path, fingerprint):
    """Where the cost of the teacher in ``weights_path`` is kept: beside it, named
    by the file and the teacher's fingerprint (so other weights never match)."""
    folder, name = os.path.split(os.path.abspath(weights_path))
    return os.path.join(folder, f"{name}.wkd_fc_cost.{fingerprint[:16]}.pt")


def teacher_cost_matrix(teacher, classifier, weights_path=None):
    """The ``fc`` cost of ``teacher``: computed once, then read from beside its checkpoint.

    The file holds the teacher's full fingerprint, the classifier's name and
    the matrix; one that does not match is recomputed. Without a checkpoint
    file, or when its folder cannot be written, the cost is computed in memory.

    Args:
        teacher: the teacher, with its weights loaded.
        classifier: the qualified name of its classifier layer.
        weights_path: its checkpoint, or None.

    Returns:
        ``[classes, classes]`` float32 on the classifier's device.
    """
    weight = teacher.get_submodule(classifier).weight
    if not weights_path or not os.path.isfile(weights_path):
        return classifier_cost(weight)
    from ..engine.teacher_cache import teacher_fingerprint   # engine imports distillers
    fingerprint = teacher_fingerprint(teacher)
    path = cost_file(weights_path, fingerprint)
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if (saved.get("fingerprint") == fingerprint and saved.get("classifier") == classifier
                    and saved["cost"].shape == (weight.shape[0],) * 2):
                return saved["cost"].to(weight.device)
        except Exception:       # an unreadable or foreign file is replaced below
            pass
    cost = classifier_cost(weight)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save({"fingerprint": fingerprint, "classifier": classifier,
                    "cost": cost.cpu()}, temporary)
        os.replace(temporary, path)     # atomic: concurrent runs never read half a file
    except OSError:                     # a read-only folder: keep it in memory
        if os.path.exists(temporary):
            os.remove(temporary)
    return cost


def sinkhorn_cost(student_probs, teacher_probs, cost, reg, iterations):
    """Entropic optimal transport from ``student_probs`` to ``teacher_probs``.

    Rows of the probabilities may be zero on some classes (the target class):
    those classes then carry no flow, which is the transport over the other
    classes alone, with one shared ``[K, K]`` kernel instead of a cost per sample.

    Args:
        student_probs, teacher_probs: ``[B, K]``.
        cost: ``[K, K]``.
        reg: the entropic regularisation lambda.
        iterations: Sinkhorn iterations.

    Returns:
        ``[B]``: ``sum_ij flow_ij cost_ij``, ``flow = diag(u) K diag(v)``.
    """
    kernel = torch.exp(-cost / reg)
    support = (student_probs > 0).float()
    u = support / support.sum(dim=1, keepdim=True)
    for _ in range(iterations):
        v = teacher_probs / (u @ kernel + 1e-8)
        u = student_probs / (v @ kernel.t() + 1e-8)
    return (u * (v @ (kernel * cost).t())).sum(dim=1)


def wkd_logit_loss(student_logits, teacher_logits, target, cost, temperature, reg=0.05,
                   iterations=10):
    """WKD-L's two terms, in fp32.

    Returns:
        ``(target_term, wasserstein)``: NKD's ``-mean t_y log s_y`` at temperature
        1, and the batch mean of the Sinkhorn distance between the non-target
        distributions at ``temperature`` over ``relu(cost) + 1e-8``.
    """
    # fp32 throughout: autocast would run Sinkhorn's products in half precision.
    with torch.autocast(student_logits.device.type, enabled=False):
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        index = target.view(-1, 1)
        log_student = F.log_softmax(student_logits, dim=1).gather(1, index)
        teacher = F.softmax(teacher_logits, dim=1).gather(1, index)
        target_term = -(teacher * log_student).mean()
        is_target = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, index, True)
        student_others = F.softmax(
            (student_logits / temperature).masked_fill(is_target, -math.inf), dim=1)
        teacher_others = F.softmax(
            (teacher_logits / temperature).masked_fill(is_target, -math.inf), dim=1)
        distance = sinkhorn_cost(student_others, teacher_others, F.relu(cost.float()) + 1e-8,
                                 reg, iterations)
    return target_term, distance.mean()


def _cell_counts(size, grid, device):
    """How many rows (or columns) each of ``grid`` adaptive-pooling cells spans."""
    index = torch.arange(grid, device=device)
    return (torch.div((index + 1) * size + grid - 1, grid, rounding_mode="floor")
            - torch.div(index * size, grid, rounding_mode="floor"))


def gaussian_moments(feature_map, grid=1, eps=1e-5):
    """Per-channel mean and ``sqrt(unbiased variance + eps)`` of every cell of a
    ``grid x grid`` split (adaptive pooling's cells), in fp32.

    Returns:
        ``(mean, std)``, each ``[B, C, grid, grid]``.
    """
    # The variance does not move with a shift; removing the channel's mean first
    # keeps E[x^2] - E[x]^2 away from cancellation.
    shift = feature_map.float().mean(dim=(2, 3), keepdim=True).detach()
    x = feature_map.float() - shift
    mean = F.adaptive_avg_pool2d(x, grid)
    second = F.adaptive_avg_pool2d(x * x, grid)
    count = (_cell_counts(x.shape[2], grid, x.device).view(-1, 1)
             * _cell_counts(x.shape[3], grid, x.device).view(1, -1)).float()
    variance = (second - mean * mean).clamp_min(0) * count / (count - 1).clamp_min(1)
    return mean + shift, torch.sqrt(variance + eps)


def wkd_feature_loss(student_map, teacher_map, grid=1, eps=1e-5):
    """WKD-F's two terms between maps of one shape.

    Returns:
        ``(mean_term, std_term)``: squared differences of the cells' means, and
        of their standard deviations, summed and divided by ``grid^2 x batch``.
    """
    student_mean, student_std = gaussian_moments(student_map, grid, eps)
    teacher_mean, teacher_std = gaussian_moments(teacher_map, grid, eps)
    scale = grid * grid * student_map.shape[0]
    return ((student_mean - teacher_mean).pow(2).sum() / scale,
            (student_std - teacher_std).pow(2).sum() / scale)


def cosine_decay(weight, epoch, start, epochs):
    """``weight`` until ``start``, then decayed by cosine to 0 at ``epochs``."""
    if epoch <= start or epochs <= start:
        return weight
    return 0.5 * weight * (1 + math.cos(math.pi * (epoch - start) / (epochs - start)))


@DISTILLERS.register("WKD")
class WKD(Distiller):
    """Cross-entropy, WKD-L (logits) and WKD-F (features); either part may be off.

    Losses: ``loss_ce``; with WKD-L ``loss_target`` (unweighted, as the authors)
    and ``loss_wkd_logit``; with WKD-F ``loss_wkd_feat``.

    Args:
        student, teacher: the models.
        cost: ``[classes, classes]`` class-to-class cost (WKD-L), e.g.
            :func:`teacher_cost_matrix`; needed when ``logit_weight`` > 0.
        ce_weight, logit_weight, feat_weight: weights; a part whose weight is 0
            is not computed and its teacher outputs are not read.
        temperature: WKD-L's temperature.
        sharpen: the cost becomes ``1 - exp(-sharpen * cost)`` (0: unchanged).
        sinkhorn_reg, sinkhorn_iterations: Sinkhorn's lambda and iterations.
        hint_layer: index into ``feats["feats"]`` of the maps WKD-F compares.
        mean_cov_ratio: weight of WKD-F's mean term against its std term.
        grid: WKD-F's cells per side.
        eps: added to the variances.
        decay_epoch, epochs: the weights decay by cosine from ``decay_epoch`` to ``epochs``.
        image_shape: ``(C, H, W)`` of the training images, to probe the maps.

    Raises:
        UserError: both weights 0, a missing cost, a bad ``hint_layer`` or maps
            the projector cannot map.
    """

    # An instance whose logit or feature weight is 0 reads less.
    teacher_reads = frozenset({"logits", "feats"})
    student_reads = frozenset({"logits", "feats"})

    def __init__(self, student, teacher, cost=None, ce_weight=1.0, logit_weight=1.0,
                 feat_weight=1.0, temperature=4.0, sharpen=1.0, sinkhorn_reg=0.05,
                 sinkhorn_iterations=10, hint_layer=-1, mean_cov_ratio=2.0, grid=4, eps=1e-5,
                 decay_epoch=0, epochs=240, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        if not logit_weight and not feat_weight:
            raise UserError("WKD.LOSS.WKD_LOGIT_WEIGHT and WKD.LOSS.WKD_FEAT_WEIGHT are both 0: "
                            "set one of them above 0 (WKD-L, WKD-F)")
        self.ce_weight, self.logit_weight, self.feat_weight = ce_weight, logit_weight, feat_weight
        self.temperature = temperature
        self.sinkhorn_reg, self.sinkhorn_iterations = sinkhorn_reg, sinkhorn_iterations
        self.hint_layer, self.mean_cov_ratio, self.grid, self.eps = (hint_layer, mean_cov_ratio,
                                                                     grid, eps)
        self.decay_epoch, self.epochs = decay_epoch, epochs
        teacher_reads, student_reads = set(), {"logits"}
        if logit_weight:
            if cost is None:
                raise ValueError("WKD with a logit weight needs the class-to-class cost")
            cost = cost.float()
            if sharpen:
                cost = 1.0 - torch.exp(-sharpen * cost)
            # Not persistent: it follows from the teacher, which is not saved either.
            self.register_buffer("cost", cost, persistent=False)
            teacher_reads.add("logits")
        if feat_weight:
            self.projector = self._build_projector(image_shape)
            teacher_reads.add("feats")
            student_reads.add("feats")
        self.teacher_reads = frozenset(teacher_reads)
        self.student_reads = frozenset(student_reads)

    def _build_projector(self, image_shape):
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        count = min(len(student_feats["feats"]), len(teacher_feats["feats"]))
        if not -count <= self.hint_layer < count:
            raise UserError(f"WKD.HINT_LAYER {self.hint_layer} is out of range: the models give "
                            f"{count} feature maps (valid -{count}..{count - 1})")
        student_map = student_feats["feats"][self.hint_layer]
        teacher_map = teacher_feats["feats"][self.hint_layer]
        student_shape, teacher_shape = tuple(student_map.shape[1:]), tuple(teacher_map.shape[1:])
        problem = (f"WKD-F cannot project the student's map {student_shape} to the teacher's "
                   f"{teacher_shape}; pick another WKD.HINT_LAYER")
        try:
            projector = Regressor(student_shape, teacher_shape).to(student_map.device)
        except UserError:
            raise UserError(problem) from None
        with torch.no_grad():
            if projector.conv(student_map).shape[1:] != teacher_map.shape[1:]:
                raise UserError(problem)
        return projector

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        cost = None
        if cfg.WKD.LOSS.WKD_LOGIT_WEIGHT:
            cost = cost_from_config(cfg, teacher, (3, size, size))
        return cls(student, teacher, cost=cost, ce_weight=cfg.WKD.LOSS.CE_WEIGHT,
                   logit_weight=cfg.WKD.LOSS.WKD_LOGIT_WEIGHT,
                   feat_weight=cfg.WKD.LOSS.WKD_FEAT_WEIGHT, temperature=cfg.WKD.TEMPERATURE,
                   sharpen=cfg.WKD.COST_MATRIX_SHARPEN, sinkhorn_reg=cfg.WKD.SINKHORN.LAMBDA,
                   sinkhorn_iterations=cfg.WKD.SINKHORN.ITER, hint_layer=cfg.WKD.HINT_LAYER,
                   mean_cov_ratio=cfg.WKD.MEAN_COV_RATIO, grid=cfg.WKD.SPATIAL_GRID,
                   eps=cfg.WKD.EPS, decay_epoch=cfg.WKD.LOSS.COSINE_DECAY_EPOCH,
                   epochs=cfg.SOLVER.EPOCHS, image_shape=(3, size, size))

    def teacher_temperatures(self):
        # The target term reads the teacher's softmax at 1, the Wasserstein term at T.
        return tuple(sorted({1.0, float(self.temperature)})) if self.logit_weight else None

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
        if self.logit_weight:
            target_term, distance = wkd_logit_loss(
                logits, teacher_logits, target, self.cost, self.temperature, self.sinkhorn_reg,
                self.sinkhorn_iterations)
            weight = cosine_decay(self.logit_weight, self.epoch, self.decay_epoch, self.epochs)
            losses["loss_target"] = target_term
            losses["loss_wkd_logit"] = weight * distance
        if self.feat_weight:
            student_map = self.projector(feats["feats"][self.hint_layer])
            mean_term, std_term = wkd_feature_loss(student_map,
                                                   teacher_feats["feats"][self.hint_layer],
                                                   self.grid, self.eps)
            weight = cosine_decay(self.feat_weight, self.epoch, self.decay_epoch, self.epochs)
            losses["loss_wkd_feat"] = weight * (self.mean_cov_ratio * mean_term + std_term)
        return logits, losses


def cost_from_config(cfg, teacher, image_shape):
    """WKD-L's class-to-class cost for the run's teacher (WKD.COST_MATRIX).

    Raises:
        UserError: an unknown WKD.COST_MATRIX, several teachers, or a teacher
            without a linear classifier.
    """
    if cfg.WKD.COST_MATRIX not in COST_MATRICES:
        raise UserError(f"WKD.COST_MATRIX {cfg.WKD.COST_MATRIX!r} is not computed by mdistill; "
                        f"valid: {', '.join(COST_MATRICES)} (the authors' CKA matrices need "
                        f"their own tools)")
    if len(cfg.DISTILLER.TEACHERS) > 1:
        raise UserError("WKD-L's cost comes from one teacher's classifier; set "
                        "DISTILLER.TEACHER instead of DISTILLER.TEACHERS (or "
                        "WKD.LOSS.WKD_LOGIT_WEIGHT 0)")
    from ..engine.builder import teacher_weights_path   # engine imports distillers
    _, teacher_feats = probe_features(teacher, image_shape)
    width = teacher_feats["pooled_feat"].shape[1]
    classifier = find_classifier(teacher, width)
    if classifier is None:
        raise UserError(f"WKD's fc cost needs the teacher's classifier, but {model_label(teacher)} "
                        f"has no nn.Linear layer reading its pooled_feat ({width} wide)")
    return teacher_cost_matrix(teacher, classifier, teacher_weights_path(cfg))
