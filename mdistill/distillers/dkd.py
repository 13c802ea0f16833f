"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, standardized_if
from .sdd import scale_decoupling_from_config


def dkd_loss(student_logits, teacher_logits, target, alpha, beta, temperature,
             reduction="mean"):
    """KD split into its target-class and non-target-class parts, in fp32.

    With ``p = softmax(z / T)``: TCKD is the KL between the teacher's and the
    student's binary distributions ``(p_target, 1 - p_target)``; NCKD the KL
    between their distributions over the other classes, renormalised. Both are
    summed over classes, averaged over the batch and scaled by ``T^2``.

    Log-probabilities are taken in log space (``1 - p_target`` as a
    log-sum-exp over the other classes), so confident predictions give no
    ``log(0)``; mdistiller's ``log`` of the probabilities gives the same values
    wherever it is finite.

    Args:
        reduction: ``"mean"`` over the batch, or ``"none"``: one value per row (SDD).

    Returns:
        ``alpha * TCKD + beta * NCKD``.
    """
    batch, classes = student_logits.shape
    others = torch.ones_like(student_logits, dtype=torch.bool)
    others[torch.arange(batch, device=target.device), target] = False

    def split(logits):
        scaled = logits.float() / temperature
        log_total = scaled.logsumexp(dim=1)
        other_logits = scaled[others].view(batch, classes - 1)
        log_target = scaled.gather(1, target.view(-1, 1)).squeeze(1) - log_total
        log_rest = other_logits.logsumexp(dim=1) - log_total
        binary = torch.stack([log_target, log_rest], dim=1)
        return binary, F.log_softmax(other_logits, dim=1)

    student_binary, student_others = split(student_logits)
    teacher_binary, teacher_others = split(teacher_logits)
    tckd = F.kl_div(student_binary, teacher_binary, reduction="none", log_target=True).sum(1)
    nckd = F.kl_div(student_others, teacher_others, reduction="none", log_target=True).sum(1)
    per_row = (alpha * tckd + beta * nckd) * temperature ** 2
    return per_row.mean() if reduction == "mean" else per_row


@DISTILLERS.register("DKD")
class DKD(Distiller):
    """Cross-entropy plus decoupled KD, the latter warmed up linearly.

    ``loss_ce = ce_weight * CE`` and ``loss_kd = min(epoch / warmup, 1) *
    (alpha * TCKD + beta * NCKD)`` (see :func:`dkd_loss`).

    Args:
        student, teacher: the models.
        ce_weight: weight of the cross-entropy.
        alpha, beta: weights of the target-class and non-target-class terms.
        temperature: softmax temperature T.
        warmup: epochs over which the DKD term ramps up to full weight.
        logit_stand: standardize both models' logits per sample first (Sun et al.
            2024); ``temperature`` is then their base temperature and ``alpha``,
            ``beta`` carry their KD weight (e.g. 9 and 9 * 8).
        scale_decoupling: a :class:`~mdistill.distillers.sdd.ScaleDecoupling`
            (SDD, Wei et al. 2024): DKD on every pooled region of the two models'
            last maps, complementary regions weighted; None: plain DKD.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    option_sections = ("SDD",)

    def __init__(self, student, teacher, ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0,
                 warmup=20, logit_stand=False, scale_decoupling=None):
        super().__init__(student, teacher)
        self.logit_stand = logit_stand
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup
        self.scale_decoupling = scale_decoupling
        if scale_decoupling is not None:
            self.teacher_reads = scale_decoupling.teacher_reads
            self.student_reads = scale_decoupling.student_reads

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, ce_weight=cfg.DKD.CE_WEIGHT, alpha=cfg.DKD.ALPHA,
                   beta=cfg.DKD.BETA, temperature=cfg.DKD.T, warmup=cfg.DKD.WARMUP,
                   logit_stand=cfg.DKD.LOGIT_STAND,
                   scale_decoupling=scale_decoupling_from_config(cfg, student, teacher,
                                                                 data_info))

    def teacher_temperatures(self):
        # Standardized logits are not the teacher's softmax at a temperature.
        return None if self.logit_stand else (float(self.temperature),)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        if self.scale_decoupling is None:
            student_kd, teacher_kd = standardized_if(self.logit_stand, logits, teacher_logits)
            loss = dkd_loss(student_kd, teacher_kd, target, self.alpha, self.beta,
                            self.temperature)
        else:
            student_rows, teacher_rows, target_rows, weights = self.scale_decoupling.rows(
                self.student, feats, self.teacher, teacher_feats, target)
            student_kd, teacher_kd = standardized_if(self.logit_stand, student_rows,
                                                     teacher_rows)
            loss = (weights * dkd_loss(student_kd, teacher_kd, target_rows, self.alpha,
                                       self.beta, self.temperature, reduction="none")).mean()
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.warmup_factor(self.warmup) * loss,
        }
