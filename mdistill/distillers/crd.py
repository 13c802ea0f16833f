"""CRD: Tian et al., "Contrastive Representation Distillation" (ICLR 2020)."""
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..data import ContrastiveSampler
from ..registry import DISTILLERS
from ..utils.dist import all_gather_cat, all_reduce_sum, get_rank, get_world_size
from .base import Distiller


class Embed(nn.Module):
    """Linear projection followed by L2 normalisation, in fp32."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def nce_loss(scores, num_data, eps=1e-7):
    """CRD's NCE loss, averaged over the batch.

    With ``m = K`` negatives and the uniform noise ``Pn = 1 / num_data``, a
    score ``P`` is taken from the data with probability ``P / (P + m Pn)``:
    ``loss = -(log h(positive) + sum over negatives of log(1 - h(negative)))``.

    Args:
        scores: ``[B, K + 1]`` normalised scores ``exp(<v, memory row> / T) / Z``,
            column 0 the positive.
        num_data: the number of training samples (memory rows).
        eps: added to the denominators, as CRD.

    Returns:
        A scalar tensor.
    """
    noise = (scores.shape[1] - 1) / num_data             # m * Pn
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


@DISTILLERS.register("CRD")
class CRD(Distiller):
    """Cross-entropy plus the contrastive loss between student and teacher embeddings.

    Each side's embedding is scored against the *other* side's memory bank:
    the row of column 0 of ``contrastive_index`` (the sample itself, or a
    same-class sample in "relax" mode) is the positive, the other K rows,
    from other classes, the negatives. ``loss_ce = ce_weight * CE`` and
    ``loss_feat = feat_weight * (NCE(student vs teacher memory) + NCE(teacher
    vs student memory))``. After an accepted step (:meth:`after_step`; the
    forward writes nothing), the banks' rows of the batch's samples move
    towards the step's embeddings (momentum, then re-normalised), with every
    process's batch, so the banks stay identical across processes.

    The banks (``memory_student``, ``memory_teacher``) and the normalisation
    constants (``z_student``, ``z_teacher``, estimated on the first accepted
    batch as ``mean score * num_data`` and then fixed) are buffers: saved in
    checkpoints and left alone by DistributedDataParallel.

    Args:
        student, teacher: the models.
        num_data: training set size (memory bank rows).
        sampler: callable ``(index, target) -> LongTensor [B, K+1]``, e.g. a
            :class:`~mdistill.data.ContrastiveSampler`; the loader adds its
            result to each batch as ``contrastive_index``.
        feat_dim: embedding width.
        ce_weight, feat_weight: weights of cross-entropy and the contrastive loss.
        temperature: NCE temperature.
        momentum: memory update momentum (the old row's share).
        image_shape: input shape used to probe the pooled feature widths.
    """

    teacher_reads = frozenset({"pooled_feat"})
    student_reads = frozenset({"logits", "pooled_feat"})

    def __init__(self, student, teacher, num_data, sampler, feat_dim=128, ce_weight=1.0,
                 feat_weight=0.8, temperature=0.07, momentum=0.5, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.embed_student = Embed(student_feats["pooled_feat"].shape[1], feat_dim)
        self.embed_teacher = Embed(teacher_feats["pooled_feat"].shape[1], feat_dim)
        self.sampler = sampler
        self.num_data = num_data
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.temperature = temperature
        self.momentum = momentum
        # CRD's initialisation: uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3),
        # so each row has an expected squared norm of 1.
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("z_student", torch.tensor(-1.0))   # -1: not estimated yet
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._z_fixed = None        # cached "Z is known" (read once from the buffers)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        # CRD.FEAT.STUDENT_DIM / TEACHER_DIM are not read: the widths are probed.
        sampler = ContrastiveSampler(data_info.train_targets, cfg.CRD.NCE.K, mode=cfg.CRD.MODE,
                                     seed=cfg.EXPERIMENT.SEED, rank=get_rank())
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, num_data=len(data_info.train_targets), sampler=sampler,
                   feat_dim=cfg.CRD.FEAT.DIM, ce_weight=cfg.CRD.LOSS.CE_WEIGHT,
                   feat_weight=cfg.CRD.LOSS.FEAT_WEIGHT, temperature=cfg.CRD.NCE.TEMPERATURE,
                   momentum=cfg.CRD.NCE.MOMENTUM, image_shape=(3, size, size))

    def extra_batch_fields(self):
        return {"contrastive_index": self.sampler}

    def ddp_ignored_names(self):
        # Kept identical on every process by _update_memory, which applies all processes'
        # rows; Z is estimated from all processes' scores.
        return super().ddp_ignored_names() + ["memory_student", "memory_teacher",
                                              "z_student", "z_teacher"]

    def z_fixed(self):
        """Whether Z has been estimated (one host read, then cached)."""
        if not self._z_fixed:
            self._z_fixed = bool(self.z_student.item() > 0 and self.z_teacher.item() > 0)
        return self._z_fixed

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self._z_fixed = None
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def _scores(self, embedding, memory, contrastive_index, z_buffer, z_name):
        """``exp(<memory row, embedding> / T) / Z`` for the positive and the negatives.

        Before Z is fixed, it is estimated from this batch (over every process) and
        stashed for :meth:`after_step`, which fixes it."""
        rows = memory[contrastive_index]                                  # [B, K+1, D]
        scores = torch.exp(torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2) / self.temperature)
        if self.z_fixed():
            return scores / z_buffer
        z = all_reduce_sum(scores.detach().mean().reshape(1))[0] / get_world_size() * self.num_data
        self.stash(**{z_name: z})
        return scores / z

    @torch.no_grad()
    def _update_memory(self, memory, index, embedding):
        index, embedding = all_gather_cat(index), all_gather_cat(embedding)
        # A padded distributed epoch can hold one sample twice; index_copy_ with
        # repeated indices picks a winner nondeterministically (CUDA), which would
        # let the processes' banks drift apart. Keep the last occurrence of each.
        unique, inverse = torch.unique(index, return_inverse=True)
        positions = torch.arange(len(index), device=index.device)
        last = torch.zeros_like(unique).scatter_reduce_(0, inverse, positions, reduce="amax",
                                                         include_self=False)
        rows = memory[unique] * self.momentum + embedding[last] * (1 - self.momentum)
        memory.index_copy_(0, unique, F.normalize(rows, dim=1))

    @torch.no_grad()
    def after_step(self):
        """Commit the accepted step: fix Z (first step) and update both memory banks."""
        stashed = self.stashed
        if "index" not in stashed:
            return
        for name in ("z_student", "z_teacher"):
            if name in stashed:
                getattr(self, name).copy_(stashed[name])
        self._z_fixed = None
        self._update_memory(self.memory_student, stashed["index"], stashed["student_embedding"])
        self._update_memory(self.memory_teacher, stashed["index"], stashed["teacher_embedding"])

    def forward_train(self, image, target, index=None, contrastive_index=None, **batch):
        if index is None or contrastive_index is None:
            raise ValueError("CRD needs the batch fields 'index' and 'contrastive_index' "
                             "(see extra_batch_fields)")
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        with torch.autocast(image.device.type, enabled=False):
            student_embedding = self.embed_student(feats["pooled_feat"])
            teacher_embedding = self.embed_teacher(teacher_feats["pooled_feat"])
            student_scores = self._scores(student_embedding, self.memory_teacher,
                                          contrastive_index, self.z_student, "z_student")
            teacher_scores = self._scores(teacher_embedding, self.memory_student,
                                          contrastive_index, self.z_teacher, "z_teacher")
            contrastive = (nce_loss(student_scores, self.num_data)
                           + nce_loss(teacher_scores, self.num_data))
        self.stash(index=index, student_embedding=student_embedding.detach(),
                   teacher_embedding=teacher_embedding.detach())
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * contrastive}
