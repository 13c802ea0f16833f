"""OFA-KD: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation" (NeurIPS 2023; Hao840/OFAKD).

Branches on chosen student stages project their maps into the logit space,
where any teacher's logits live whatever its architecture, and every branch
(and the student's own head) is trained against the teacher with the OFA loss,
whose target-class term is enhanced by the power ``eps``.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..models.stages import model_name, stage_info, unwrapped
from ..registry import DISTILLERS
from .base import Distiller, probe_features

#: Side of the token grid the transformer branches merge patches down to (7 x 7,
#: a 224 px ViT's last Swin stage), as the authors.
FINAL_PATCH_GRID = 7
#: Attention heads of the transformer branches' blocks, as the authors.
BRANCH_HEADS = 4


def ofa_loss(student_logits, teacher_logits, target, eps, temperature=1.0):
    """The OFA loss: ``-sum_c ((p_t + 1_y)^eps - 1_y) log p_s``, averaged over the batch.

    ``p_s`` and ``p_t`` are the softmaxes at ``temperature``; with ``eps`` 1 it is
    the cross-entropy to the teacher's softened distribution (KD without T^2), above
    1 the target class's weight grows the less confident the teacher is in it.

    Args:
        student_logits, teacher_logits: ``[B, C]``.
        target: ``[B]`` class indices, or ``[B, C]`` soft targets (mixed or
            smoothed labels), whose argmax is the target class, as the authors.
        eps: the target-enhancement exponent.
        temperature: softmax temperature of both.

    Returns:
        A scalar, computed in fp32.
    """
    if target.dim() == 2:
        target = target.argmax(dim=1)
    target_mask = F.one_hot(target, student_logits.shape[1]).float()
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=1)
    weights = (teacher_probs + target_mask).pow(eps) - target_mask
    return -(weights * log_student).sum(dim=1).mean()


def separable_downsample(in_channels, out_channels):
    """Halve a map's side: depthwise 3x3 at stride 2 and pointwise, BN, ReLU,
    then depthwise 3x3 and pointwise to ``out_channels``, BN, ReLU (the authors'
    down-sampling block for CNN students)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels,
                  bias=False),
        nn.Conv2d(in_channels, in_channels, 1, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(),
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU())


def cnn_branch(in_channels, halvings, width, num_classes):
    """The branch of a CNN stage: ``halvings`` separable down-sampling blocks
    (channels doubling, the last to ``width``), or a 1x1 convolution to ``width``
    on the last stage; then global pooling and a linear classifier."""
    layers = []
    for index in range(halvings):
        out_channels = width if index == halvings - 1 else in_channels * 2
        layers.append(separable_downsample(in_channels, out_channels))
        in_channels = out_channels
    if not halvings:
        layers.append(nn.Conv2d(in_channels, width, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """Swin's patch merging on a ``[B, D, h, w]`` token map: each 2x2 neighbourhood's
    tokens concatenated, layer-normed and projected to ``out_dim``, then ``act``."""

    def __init__(self, dim, out_dim, act=True):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x):
        quarters = [x[:, :, row::2, column::2] for column in (0, 1) for row in (0, 1)]
        merged = torch.cat(quarters, dim=1).permute(0, 2, 3, 1)     # B, h/2, w/2, 4D
        return self.act(self.reduction(self.norm(merged))).permute(0, 3, 1, 2)


class TransformerBranch(nn.Module):
    """The branch of a transformer stage: patch merging down to a 7 x 7 grid (into
    the student's feature width), ``blocks`` pre-norm transformer blocks, the
    tokens' mean and a linear classifier."""

    def __init__(self, dim, grid, width, blocks, num_classes):
        super().__init__()
        merges = max(int(math.log2(grid / FINAL_PATCH_GRID)), 0) if grid else 0
        layers = [PatchMerging(dim if index == 0 else width, width, act=index != merges - 1)
                  for index in range(merges)]
        if not merges and dim != width:
            layers.append(nn.Conv2d(dim, width, 1))     # the merger's projection, alone
        self.merge = nn.Sequential(*layers)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, BRANCH_HEADS, dim_feedforward=4 * width,
                                       dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True),
            blocks, enable_nested_tensor=False)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        tokens = self.merge(x).flatten(2).transpose(1, 2)        # B, tokens, width
        return self.classifier(self.blocks(tokens).mean(dim=1))


def init_branch(module):
    """The authors' initialisation: convolutions Kaiming-normal (fan-out, ReLU), BN
    weights 1 and biases 0, linear weights truncated normal (std 0.02), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def feature_width(model, image_shape):
    """The width of what the model's classifier reads: a timm network's
    ``num_features`` (no run, so a teacher built for another size is fine),
    else the ``pooled_feat`` of one probe."""
    network = getattr(unwrapped(model), "network", None)
    if isinstance(getattr(network, "num_features", None), int):
        return network.num_features
    return probe_features(model, image_shape)[1]["pooled_feat"].shape[1]


@DISTILLERS.register("OFA")
class OFA(Distiller):
    """CE on the labels, the OFA loss on the student's logits and on a branch from
    each chosen stage, all against the teacher's logits.

    Args:
        student, teacher: the models.
        num_classes: the logits' width.
        image_size: the training images' side (the student's stages are probed at it).
        stages: the student's stages that get a branch, numbered from 1 over its
            maps besides the stem (1 2 3 4 on a four-stage model, the authors'
            default); empty: every one.
        eps: the target-enhancement exponent (1: plain soft targets).
        temperature: softmax temperature.
        loss_weight: weight of the branches' losses (summed over branches).
        ce_weight: weight of the cross-entropy on the labels.
        kd_weight: weight of the OFA loss on the student's own logits.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits", "feats"})
    #: The target term reads the label; with soft targets (Mixup, CutMix, label
    #: smoothing, all in the authors' recipes) it takes their argmax, as the
    #: authors do, so the recipe's soft targets serve it.
    reads_hard_labels = False

    def __init__(self, student, teacher, num_classes, image_size=32, stages=(), eps=1.0,
                 temperature=1.0, loss_weight=1.0, ce_weight=1.0, kd_weight=1.0):
        super().__init__(student, teacher)
        self.eps = eps
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        image_shape = (3, image_size, image_size)
        feats = probe_features(student, image_shape)[1]
        infos = stage_info(student, image_size, feats)
        own = [index for index, info in enumerate(infos) if not info.stem]
        stages = list(stages) or list(range(1, len(own) + 1))
        bad = [stage for stage in stages if not 1 <= stage <= len(own)]
        if bad or len(set(stages)) != len(stages):
            raise UserError(f"OFA.STAGES {list(stages)}: {model_name(student)} has stages 1 to "
                            f"{len(own)} besides its stem; give distinct numbers among them "
                            f"(or [] for every one)")
        width = max(feature_width(student, image_shape), feature_width(teacher, image_shape))
        last = infos[own[-1]]
        self.stage_indices = [own[stage - 1] for stage in stages]
        branches = {}
        for stage, index in zip(stages, self.stage_indices):
            info, grid = infos[index], feats["feats"][index].shape[2]
            if getattr(unwrapped(student), "token_maps", False):
                student_width = feats["pooled_feat"].shape[1]
                branches[str(index)] = TransformerBranch(
                    info.channels, grid, student_width, max(len(own) - stage, 1), num_classes)
            else:
                halvings = max(round(math.log2(last.stride / info.stride)), 0)
                branches[str(index)] = cnn_branch(info.channels, halvings, width, num_classes)
        self.branches = nn.ModuleDict(branches)
        init_branch(self.branches)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, num_classes=data_info.num_classes,
                   image_size=getattr(data_info, "image_size", 32), stages=cfg.OFA.STAGES,
                   eps=cfg.OFA.EPS, temperature=cfg.OFA.TEMPERATURE,
                   loss_weight=cfg.OFA.LOSS_WEIGHT, ce_weight=cfg.OFA.CE_WEIGHT,
                   kd_weight=cfg.OFA.KD_WEIGHT)

    def teacher_temperatures(self):
        # The target-enhanced power is not the teacher's softmax at a temperature.
        return (float(self.temperature),) if self.eps == 1 else None

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        maps = feats["feats"]
        branch_losses = [ofa_loss(self.branches[str(index)](maps[index]), teacher_logits,
                                  target, self.eps, self.temperature)
                         for index in self.stage_indices]
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * ofa_loss(logits, teacher_logits, target, self.eps,
                                                 self.temperature),
            "loss_ofa": self.loss_weight * sum(branch_losses)}
