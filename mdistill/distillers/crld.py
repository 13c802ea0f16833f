"""CRLD: Zhang, Liu, Cai & Ma, "Cross-View Consistency Regularisation for Knowledge
Distillation" (ACM MM 2024).

What the authors' code computes (its public copy scx-822/CRLD-main,
``mdistiller/distillers/CRLD.py``, ``mdistiller/engine/cfg.py``,
``mdistiller/dataset/cifar100.py``), term by term:

* two views of each image: the loader's weak one (crop and flip) and a strong
  one (its own crop and flip, ``RandAugment(2, 10)`` and Cutout: the same view
  as MLKD's, :class:`~mdistill.data.randaugment.RandAugmentView`), each through
  the student and the teacher;
* two confidence masks from the teacher's plain softmax (temperature 1): a
  sample counts for the within-view terms when the teacher's top probability
  on the weak view is at least ``tau_w`` (0.9), for the cross-view terms when
  its top probability on the strong view is at least ``tau_s`` (0.2);
* ``loss_ce``: ``ce_weight * (CE(weak) + CE(strong))``;
* ``loss_kd_wv`` (within view): ``wv_weight * mean_i mask_w[i] * (kd_i(s_w, t_w)
  + kd_i(s_s, t_s))``;
* ``loss_kd_cv`` (cross view): ``cv_weight * mean_i mask_s[i] * (kd_i(s_s, t_w)
  + kd_i(s_w, t_s))``;

with ``kd_i`` sample i's KL(softmax(t/T) || softmax(s/T)) times T^2, and the
mean over every sample of the batch (a masked one counts as 0). The weak
view's logits are the step's predictions.
"""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller
from .mlkd import TwoViews


def kd_per_sample(student_logits, teacher_logits, temperature):
    """Each sample's KL(softmax(t/T) || softmax(s/T)) times T^2, a ``[B]`` tensor in fp32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature ** 2


def confident(teacher_logits, threshold):
    """``max_c softmax(t)_c >= threshold`` per sample, as a float ``[B]`` mask."""
    top = F.softmax(teacher_logits.float(), dim=1).amax(dim=1)
    return (top >= threshold).float()


@DISTILLERS.register("CRLD")
class CRLD(TwoViews, Distiller):
    """Within-view and cross-view KD on a weak and a strong view, masked by the
    teacher's confidence, plus the cross-entropy of both views.

    Args:
        student, teacher: the models.
        temperature: softmax temperature T of every KD term (scaled by T^2).
        tau_w: confidence threshold on the weak view for the within-view terms.
        tau_s: confidence threshold on the strong view for the cross-view terms.
        ce_weight: weight of each view's cross-entropy.
        wv_weight, cv_weight: weights of the within-view and cross-view terms.
        augment_ops: RandAugment ops per image of the strong view.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})

    def __init__(self, student, teacher, temperature=4.0, tau_w=0.9, tau_s=0.2, ce_weight=1.0,
                 wv_weight=2.0, cv_weight=0.5, augment_ops=2):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.tau_w = tau_w
        self.tau_s = tau_s
        self.ce_weight = ce_weight
        self.wv_weight = wv_weight
        self.cv_weight = cv_weight
        self.augment_ops = augment_ops

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.CRLD.TEMPERATURE, tau_w=cfg.CRLD.TAU_W,
                   tau_s=cfg.CRLD.TAU_S, ce_weight=cfg.CRLD.CE_WEIGHT,
                   wv_weight=cfg.CRLD.WV_WEIGHT, cv_weight=cfg.CRLD.CV_WEIGHT,
                   augment_ops=cfg.CRLD.AUGMENT_OPS)

    def teacher_temperatures(self):
        # The KD terms soften at T, the confidence masks read the plain softmax.
        return (float(self.temperature), 1.0)

    def forward_train(self, image, target, image_strong=None, **batch):
        weak, strong, teacher_weak, teacher_strong = self.both_views(image, image_strong)

        mask_weak = confident(teacher_weak, self.tau_w)
        mask_strong = confident(teacher_strong, self.tau_s)
        temperature = self.temperature
        within = (kd_per_sample(weak, teacher_weak, temperature)
                  + kd_per_sample(strong, teacher_strong, temperature))
        cross = (kd_per_sample(strong, teacher_weak, temperature)
                 + kd_per_sample(weak, teacher_strong, temperature))
        self.log_diagnostic("mask_weak", mask_weak.mean())
        self.log_diagnostic("mask_strong", mask_strong.mean())
        loss_ce = F.cross_entropy(weak.float(), target) + F.cross_entropy(strong.float(), target)
        return weak, {"loss_ce": self.ce_weight * loss_ce,
                      "loss_kd_wv": self.wv_weight * (within * mask_weak).mean(),
                      "loss_kd_cv": self.cv_weight * (cross * mask_strong).mean()}
