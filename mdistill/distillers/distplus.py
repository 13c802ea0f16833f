"""DIST+: Huang, You, Wang, Qian & Xu, "DIST+: Knowledge Distillation From a Stronger
Adaptive Teacher" (TPAMI 2025), as torchdistill implements its loss
(yoshitomo-matsubara/torchdistill ``torchdistill/losses/mid_level.py``
``DISTPlusLoss``, sample config ``configs/sample/ilsvrc2012/dist_plus/``).

DIST+ extends DIST's relation loss from the predictions to the last stage's
feature map ``f`` (``[B, C, H, W]``, student and teacher of the same shape):

* the DIST loss on the logits (:func:`~mdistill.distillers.dist.dist_loss`):
  ``tau^2 (beta * inter + gamma * intra)``;
* a channel relation: the Pearson correlation, across channels, of the two
  models' maps at each sample and position, averaged over samples and positions;
* a spatial relation: the maps summed over channels (``[B, H*W]``), then 1 - the
  mean over positions of the Pearson correlation across the batch, as DIST's
  intra-class term treats classes;
* ``loss = dist + iota * channel + kappa * spatial``, times ``kd_weight``.

Deliberate departure: torchdistill adds the channel correlation itself
(``+ iota * rho``), so minimising it would push the student's channels to
anti-correlate with the teacher's; every other relation term of DIST and DIST+
is ``1 - rho``, and so is the channel term here (the same gradient with the
sign that distils). The paper's teacher-acclimation strategy (adapting the
teacher) is not part of torchdistill's loss, nor of this method. Pearson
correlations use DIST's form, ``eps = 1e-8`` added to the product of the norms.
"""
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller
from .dist import dist_loss, pearson_correlation


def channel_relation_loss(student_map, teacher_map, eps=1e-8):
    """``1 -`` the Pearson correlation across channels of two ``[B, C, H, W]`` maps,
    averaged over samples and positions; fp32."""
    student = student_map.float().movedim(1, -1).flatten(0, -2)
    teacher = teacher_map.float().movedim(1, -1).flatten(0, -2)
    return 1 - pearson_correlation(student, teacher, eps).mean()


def spatial_relation_loss(student_map, teacher_map, eps=1e-8):
    """``1 -`` the Pearson correlation across the batch of the channel-summed maps,
    averaged over positions; fp32."""
    student = student_map.float().sum(dim=1).flatten(1)
    teacher = teacher_map.float().sum(dim=1).flatten(1)
    return 1 - pearson_correlation(student.t(), teacher.t(), eps).mean()


@DISTILLERS.register("DISTPLUS")
class DISTPlus(Distiller):
    """Cross-entropy plus DIST's logit relations and the last map's channel and
    spatial relations.

    Args:
        student, teacher: the models.
        tau: softmax temperature of the logit terms (scaled by tau^2).
        beta, gamma: weights of the inter-class and intra-class logit terms.
        iota, kappa: weights of the channel and spatial relation terms (0 turns
            one off, and with it the need for maps of equal shape).
        ce_weight, kd_weight: weights of the cross-entropy and of the DIST+ loss.
        image_shape: input shape used to probe the last maps' shapes.

    Raises:
        UserError: the last stage maps of student and teacher differ in shape
            where a term needs them equal.
    """

    teacher_reads = frozenset({"logits", "feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, tau=1.0, beta=2.0, gamma=2.0, iota=1.0, kappa=1.0,
                 ce_weight=1.0, kd_weight=2.0, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.tau = tau
        self.beta = beta
        self.gamma = gamma
        self.iota = iota
        self.kappa = kappa
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        if iota or kappa:
            (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
            student_shape = tuple(student_feats["feats"][-1].shape[1:])
            teacher_shape = tuple(teacher_feats["feats"][-1].shape[1:])
            # The channel term compares maps channel by channel at each position,
            # the spatial term position by position.
            needed = student_shape if iota else student_shape[1:]
            if needed != (teacher_shape if iota else teacher_shape[1:]):
                raise UserError(f"DISTPLUS compares the last stage maps of student and teacher, "
                                f"but they differ: {student_shape} vs {teacher_shape} (C, H, W); "
                                f"set DISTPLUS.IOTA 0 (channel term) and DISTPLUS.KAPPA 0 "
                                f"(spatial term) for this pair, or use DIST")

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, tau=cfg.DISTPLUS.TAU, beta=cfg.DISTPLUS.BETA,
                   gamma=cfg.DISTPLUS.GAMMA, iota=cfg.DISTPLUS.IOTA, kappa=cfg.DISTPLUS.KAPPA,
                   ce_weight=cfg.DISTPLUS.LOSS.CE_WEIGHT, kd_weight=cfg.DISTPLUS.LOSS.KD_WEIGHT,
                   image_shape=(3, size, size))

    def teacher_temperatures(self):
        return (float(self.tau),)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                  "loss_kd": self.kd_weight * dist_loss(logits, teacher_logits, self.tau,
                                                        self.beta, self.gamma)}
        student_map, teacher_map = feats["feats"][-1], teacher_feats["feats"][-1]
        if self.iota:
            losses["loss_channel"] = (self.kd_weight * self.iota
                                      * channel_relation_loss(student_map, teacher_map))
        if self.kappa:
            losses["loss_spatial"] = (self.kd_weight * self.kappa
                                      * spatial_relation_loss(student_map, teacher_map))
        return logits, losses
