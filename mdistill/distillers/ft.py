"""FT: Kim et al., "Paraphrasing Complex Network: Network Compression via Factor
Transfer" (NeurIPS 2018), as RepDistiller benchmarks it (HobbitLong/RepDistiller
``distiller_zoo/FT.py``, ``models/util.py``, ``helper/pretrain.py``,
``train_student.py``).

RepDistiller trains FT in two stages: an initialisation of ``--init_epochs``
30 epochs in which a paraphraser (a convolutional auto-encoder, no BN) learns
to reconstruct the teacher's last feature map, at a constant lr of 0.01 for
ResNet and WRN students (SOLVER.LR for the others), with the student in eval
mode and untrained; then the usual epochs on the cross-entropy plus 200 times
the factor-transfer loss between a translator of the student's last map
(trained with the student) and the paraphraser's encoding of the teacher's
(frozen, in eval mode).
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, Stage, match_spatial_size


def _conv_block(in_channels, out_channels, transposed=False, batch_norm=False):
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(in_channels, out_channels, 3, 1, 1)
    norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
    return [conv, *norm, nn.LeakyReLU(0.1, inplace=True)]


class Paraphraser(nn.Module):
    """Encoder C -> C -> rC -> rC and decoder rC -> rC -> C -> C (3x3 convs, LeakyReLU 0.1).

    Args:
        channels: channels of the teacher's map.
        rate: the factor's share of the channels (``k = 0.5``).
    """

    def __init__(self, channels, rate=0.5):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = nn.Sequential(*_conv_block(channels, channels),
                                     *_conv_block(channels, factor),
                                     *_conv_block(factor, factor))
        self.decoder = nn.Sequential(*_conv_block(factor, factor, transposed=True),
                                     *_conv_block(factor, channels, transposed=True),
                                     *_conv_block(channels, channels, transposed=True))

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """The student's encoder: C_s -> C_s -> rC_t -> rC_t (3x3 conv, BN, LeakyReLU 0.1)."""

    def __init__(self, student_channels, teacher_channels, rate=0.5):
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = nn.Sequential(
            *_conv_block(student_channels, student_channels, batch_norm=True),
            *_conv_block(student_channels, factor, batch_norm=True),
            *_conv_block(factor, factor, batch_norm=True))

    def forward(self, x):
        return self.encoder(x)


def factor_transfer_loss(student_factor, teacher_factor):
    """``mean |n(s) - n(t)|`` with ``n(f)`` the L2-normalised channel mean of ``f^2``
    (the larger map average-pooled to the smaller's size), in fp32."""
    student_factor, teacher_factor = match_spatial_size(student_factor.float(),
                                                        teacher_factor.float())

    def normalised(factor):
        return F.normalize(factor.pow(2).mean(dim=1).flatten(1))
    return (normalised(student_factor) - normalised(teacher_factor)).abs().mean()


@DISTILLERS.register("FT")
class FT(Distiller):
    """RepDistiller's factor transfer: train a paraphraser, then transfer its factors.

    Stages: ``init`` (``init_epochs``, the paraphraser only, constant
    ``init_lr``, the student in eval mode; ``loss_paraphrase``: the MSE of
    reconstructing the teacher's last map), then ``distill`` (SOLVER.EPOCHS,
    the student and the translator; ``loss_ce`` and ``loss_feat``).

    Args:
        student, teacher: the models.
        init_epochs: length of the initialisation (0 skips it).
        init_lr: its constant learning rate.
        rate: the factors' share of the teacher's channels.
        ce_weight, feat_weight: weights of the cross-entropy and the FT loss.
        image_shape: input shape used to probe the feature shapes.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, init_epochs=30, init_lr=0.01, rate=0.5, ce_weight=1.0,
                 feat_weight=200.0, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_map, teacher_map = student_feats["feats"][-1], teacher_feats["feats"][-1]
        self.paraphraser = Paraphraser(teacher_map.shape[1], rate).to(teacher_map.device)
        self.translator = Translator(student_map.shape[1], teacher_map.shape[1],
                                     rate).to(student_map.device)
        self.init_epochs = init_epochs
        self.init_lr = init_lr
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, init_epochs=cfg.FT.INIT_EPOCHS, init_lr=cfg.FT.INIT_LR,
                   rate=cfg.FT.RATE, ce_weight=cfg.FT.LOSS.CE_WEIGHT,
                   feat_weight=cfg.FT.LOSS.FEAT_WEIGHT, image_shape=(3, size, size))

    def stages(self, epochs):
        init = [Stage("init", self.init_epochs, parameters=lambda: list(
                    self.paraphraser.parameters()), lr=self.init_lr, schedule=False,
                    eval_modules=("student",), task_loss=False)] if self.init_epochs > 0 else []
        return init + [Stage("distill", epochs, parameters=lambda: [
            *self.student.parameters(), *self.translator.parameters()],
            eval_modules=("paraphraser",))]

    def forward_train(self, image, target, **batch):
        _, teacher_feats = self.teacher_forward(image)
        teacher_map = teacher_feats["feats"][-1]
        if self.stage == "init":
            with torch.no_grad():        # the student only reports its accuracy here
                logits, _ = self.student(image)
            rebuilt = self.paraphraser(teacher_map)
            return logits, {"loss_paraphrase": F.mse_loss(rebuilt.float(), teacher_map.float())}
        logits, feats = self.student(image)
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher_map)
        loss = factor_transfer_loss(self.translator(feats["feats"][-1]), teacher_factor)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * loss}
