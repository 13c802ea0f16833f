"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (2017)."""
import torch
import torch.nn.functional as F

from ..models import pair_model_stages
from ..registry import DISTILLERS
from .base import Distiller, match_spatial_size


def polynomial_kernel_mean(a, b):
    """Mean over the batch and every channel pair of ``(<a_i, b_j>)^2``, the
    degree-2 polynomial kernel (c = 0) between channel vectors ``[B, C, N]``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student_feature, teacher_feature):
    """Squared MMD with a polynomial kernel between the two maps' channels.

    Each channel's spatial map is flattened and L2-normalised; the channels
    are the samples of two distributions (their counts may differ). The
    larger map is average-pooled to the smaller one's size first. Computed in fp32.

    Args:
        student_feature, teacher_feature: ``[B, C, H, W]`` maps.

    Returns:
        A scalar tensor; no gradient reaches ``teacher_feature``.
    """
    student_feature, teacher_feature = match_spatial_size(student_feature.float(),
                                                          teacher_feature.float())
    student = F.normalize(student_feature.flatten(2), dim=2)
    teacher = F.normalize(teacher_feature.flatten(2), dim=2).detach()
    return (polynomial_kernel_mean(teacher, teacher) + polynomial_kernel_mean(student, student)
            - 2 * polynomial_kernel_mean(student, teacher))


@DISTILLERS.register("NST")
class NST(Distiller):
    """Cross-entropy plus neuron selectivity transfer on every paired stage.

    ``loss_ce = ce_weight * CE`` and ``loss_feat = feat_weight * sum over
    paired stages of nst_loss``. Stages pair by what the models declare
    (:func:`~mdistill.models.pair_stages`: stems left out, the others paired
    from the deepest backwards), which for mdistiller's CIFAR pairs is its
    ``feats[1:]`` pairing.

    Args:
        student, teacher: the models.
        ce_weight, feat_weight: weights of the two terms.
        image_shape: ``(C, H, W)`` of the inputs, at which the stages are probed.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=50.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.stage_pairs = pair_model_stages(student, teacher, image_shape,
                                             student_feats, teacher_feats)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, ce_weight=cfg.NST.LOSS.CE_WEIGHT,
                   feat_weight=cfg.NST.LOSS.FEAT_WEIGHT, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        student_maps, teacher_maps = feats["feats"], teacher_feats["feats"]
        pairs = [(student_maps[s], teacher_maps[t]) for s, t in self.stage_pairs]
        # fp32: the squared kernel of half-precision dot products loses the small MMD.
        with torch.autocast(image.device.type, enabled=False):
            transfer = sum((nst_loss(student, teacher) for student, teacher in pairs),
                           torch.zeros((), device=image.device))
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
