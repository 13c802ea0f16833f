"""KDSVD: Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
Value Decomposition" (ECCV 2018)."""
import torch
import torch.nn.functional as F

from ..models import pair_model_stages
from ..registry import DISTILLERS
from .base import Distiller, match_spatial_size


def _finite(tensor):
    return torch.where(torch.isfinite(tensor), tensor, torch.zeros_like(tensor))


class _StableSVD(torch.autograd.Function):
    """Thin SVD ``A = U diag(S) V^T`` of ``[B, M, N]`` matrices whose backward
    leaves out the pairs of (nearly) equal singular values.

    The usual SVD gradient divides by ``s_j^2 - s_i^2``; maps with zero columns
    (zero-padded images, dead ReLUs) have repeated zero singular values, and the
    quotient makes every gradient entry NaN. As the authors' TensorFlow code
    (sseung0703/SSKD_SVD's own SVD gradient), such pairs contribute nothing, and
    so do singular values too small to invert; otherwise this is the exact
    gradient through ``S`` and ``V`` (``U`` is not used by the loss).
    """

    @staticmethod
    def forward(ctx, matrices):
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        u, s, v = ctx.saved_tensors
        squared = s.pow(2)
        scale = squared.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        tiny = torch.finfo(s.dtype).eps * scale
        gap = squared.unsqueeze(-2) - squared.unsqueeze(-1)       # [i, j] = s_j^2 - s_i^2
        apart = gap.abs() > tiny.unsqueeze(-1)
        inverse = torch.where(apart, 1.0 / torch.where(apart, gap, torch.ones_like(gap)),
                              torch.zeros_like(gap))
        inner = torch.zeros_like(gap)
        extra = 0
        if grad_v is not None:
            vt_gv = v.transpose(-2, -1) @ grad_v
            inner = s.unsqueeze(-1) * (inverse * (vt_gv - vt_gv.transpose(-2, -1)))
            if v.shape[-2] > v.shape[-1]:
                # Fewer rows than columns: V does not span the whole row space.
                kept = s.abs() > tiny.sqrt()
                inverse_s = torch.where(kept, 1.0 / torch.where(kept, s, torch.ones_like(s)),
                                        torch.zeros_like(s))
                rest = grad_v - v @ (v.transpose(-2, -1) @ grad_v)
                extra = (u * inverse_s.unsqueeze(-2)) @ rest.transpose(-2, -1)
        if grad_s is not None:
            inner = inner + torch.diag_embed(grad_s)
        return u @ inner @ v.transpose(-2, -1) + extra


def stable_svd(matrices):
    """``(singular values [B, K], right singular vectors [B, N, K])`` of ``[B, M, N]``
    matrices (``K = min(M, N)``) with :class:`_StableSVD`'s gradient; NaNs, not
    torch's LinAlgError, when the matrices are not finite (a diverged student,
    whose cross-entropy is then non-finite and the trainer reports the step)."""
    try:
        return _StableSVD.apply(matrices)
    except torch.linalg.LinAlgError:
        batch, rows, width = matrices.shape
        count = min(rows, width)
        return (matrices.new_full((batch, count), float("nan")),
                matrices.new_full((batch, width, count), float("nan")))


def top_singular(feature, count):
    """The top ``count`` right singular vectors and L2-normalised singular values.

    As mdistiller, a ``[B, C, H, W]`` map is read as ``B`` matrices of shape
    ``[C*H, W]`` (its memory layout), so the right singular vectors live in the
    width dimension.

    Returns:
        ``(vectors [B, W, count], values [B, count])``, non-finite entries zeroed.
    """
    batch, channels, height, width = feature.shape
    matrices = feature.reshape(batch, channels * height, width)
    # At least fp32 (SVD has no half-precision kernels); float64 stays float64.
    matrices = matrices.to(torch.promote_types(matrices.dtype, torch.float32))
    values, vectors = stable_svd(matrices)
    vectors = _finite(vectors)[:, :, :count]
    values = _finite(values)[:, :count]
    return F.normalize(vectors, dim=1), F.normalize(values, dim=1)


def align_to_teacher(student_vectors, teacher_vectors):
    """For each teacher vector, the student vector of largest ``|cosine|``, signed
    so that the cosine is positive.

    Args:
        student_vectors: ``[B, W, Ks]`` candidates.
        teacher_vectors: ``[B, W, Kt]``.

    Returns:
        ``[B, W, Kt]``.
    """
    cosine = student_vectors.transpose(1, 2) @ teacher_vectors            # [B, Ks, Kt]
    largest = cosine.abs().amax(dim=1, keepdim=True)
    pick = torch.where(cosine.abs() == largest, torch.sign(cosine), torch.zeros_like(cosine))
    return student_vectors @ pick


def _radial_basis(vectors, previous):
    """``exp(-(v_i - u_j)^2 / 8)`` for every pair of rows of two stages: ``[B, W, W', K]``."""
    return torch.exp(-(vectors.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(student_features, teacher_features, k=1):
    """The SVD distillation loss over a sequence of stages, in fp32 (or float64).

    Per stage the teacher's top ``k`` right singular vectors and the
    student's top ``k + 3`` (aligned to the teacher's) are scaled by the
    teacher's normalised singular values; between consecutive stages, a
    radial-basis kernel relates the two stages' vectors, and the squared
    difference of the student's and the teacher's kernels is summed
    (non-finite entries dropped) and divided by the batch size. When a pair of
    maps differ in size, the larger one is average-pooled to the other's first.

    Args:
        student_features, teacher_features: lists of ``[B, C, H, W]`` maps, paired in order.
        k: how many singular vectors of the teacher to transfer.

    Returns:
        A scalar tensor; no gradient reaches the teacher.
    """
    loss = torch.zeros((), device=student_features[0].device)
    previous = None
    for student_feature, teacher_feature in zip(student_features, teacher_features):
        student_feature, teacher_feature = match_spatial_size(student_feature,
                                                              teacher_feature.detach())
        teacher_vectors, teacher_values = top_singular(teacher_feature, k)
        student_vectors, _ = top_singular(student_feature, k + 3)
        student_vectors = align_to_teacher(student_vectors, teacher_vectors)
        scale = teacher_values.unsqueeze(1)
        current = (student_vectors * scale, teacher_vectors * scale)
        if previous is not None:
            difference = (_radial_basis(current[0], previous[0])
                          - _radial_basis(current[1], previous[1])).pow(2)
            loss = loss + _finite(difference).sum()
        previous = current
    return loss / student_features[0].shape[0]


@DISTILLERS.register("KDSVD")
class KDSVD(Distiller):
    """Cross-entropy plus SVD-based distillation of the paired stages.

    Stages pair by what the models declare (:func:`~mdistill.models.pair_stages`:
    stems left out, the others paired from the deepest backwards), which for
    mdistiller's CIFAR pairs is its ``feats[1:]`` pairing; the pairs enter
    :func:`kdsvd_loss` from the shallowest to the deepest.

    Args:
        student, teacher: the models.
        k: singular vectors of the teacher transferred per stage.
        ce_weight, feat_weight: weights of the two terms.
        image_shape: ``(C, H, W)`` of the inputs, at which the stages are probed.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, k=1, ce_weight=1.0, feat_weight=1.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.k = k
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.stage_pairs = pair_model_stages(student, teacher, image_shape,
                                             student_feats, teacher_feats)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, k=cfg.KDSVD.K, ce_weight=cfg.KDSVD.LOSS.CE_WEIGHT,
                   feat_weight=cfg.KDSVD.LOSS.FEAT_WEIGHT, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        student_maps = [feats["feats"][s] for s, _ in self.stage_pairs]
        teacher_maps = [teacher_feats["feats"][t] for _, t in self.stage_pairs]
        # fp32: SVD has no half-precision kernels.
        with torch.autocast(image.device.type, enabled=False):
            transfer = kdsvd_loss(student_maps, teacher_maps, self.k)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
