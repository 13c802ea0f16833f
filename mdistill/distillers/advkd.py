"""ADVKD: adversarial knowledge distillation.

The student plays the generator of a GAN: a discriminator D learns to tell
the teacher's outputs ("real") from the student's ("fake"), and the student
learns to fool it while also minimising the KD loss (after Xu et al. 2017,
"Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks").
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import unknown_choice
from ..registry import DISTILLERS
from .base import Distiller, Phase, kd_loss, probe_features

GAN_LOSSES = ("bce", "lsgan", "hinge")
INPUTS = ("logits", "probs", "feature")


class Discriminator(nn.Module):
    """MLP on a class vector: ``in -> hidden[0] -> ... -> 1`` logit, LeakyReLU(0.2)
    between layers, no BatchNorm (batch statistics would let D compare the real and
    fake batches instead of judging samples).

    Args:
        in_features: width of the input vector (the number of classes).
        hidden: hidden widths.
        spectral_norm: wrap every linear layer in spectral normalisation.
    """

    def __init__(self, in_features, hidden=(256, 128), spectral_norm=False):
        super().__init__()
        layers, width = [], in_features
        for size in list(hidden) + [1]:
            linear = nn.Linear(width, size)
            if spectral_norm:
                linear = nn.utils.parametrizations.spectral_norm(linear)
            layers += [linear, nn.LeakyReLU(0.2)]
            width = size
        self.net = nn.Sequential(*layers[:-1])          # no activation on the output

    def forward(self, x):
        """``[B, in_features] -> [B]`` scores (logits for "bce")."""
        return self.net(x).squeeze(1)


class FixedProjection(nn.Module):
    """A linear map frozen at its random initialisation (weights kept as buffers, so
    they are checkpointed but no optimizer sees them)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def discriminator_loss(real_scores, fake_scores, kind, real_label=1.0):
    """D's loss: teacher outputs are real, student outputs fake.

    * ``bce``: ``BCE(d_real, real_label) + BCE(d_fake, 0)`` on logits;
    * ``lsgan``: ``mean((d_real - real_label)^2) + mean(d_fake^2)``;
    * ``hinge``: ``mean(relu(1 - d_real)) + mean(relu(1 + d_fake))`` (``real_label`` unused).
    """
    if kind == "bce":
        real = F.binary_cross_entropy_with_logits(real_scores,
                                                  torch.full_like(real_scores, real_label))
        fake = F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))
        return real + fake
    if kind == "lsgan":
        return (real_scores - real_label).pow(2).mean() + fake_scores.pow(2).mean()
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    raise unknown_choice("GAN loss", kind, GAN_LOSSES)


def generator_loss(fake_scores, kind, real_label=1.0):
    """The student's loss for D's verdict on its outputs: to be taken for real.

    ``bce``: ``BCE(d_fake, real_label)``; ``lsgan``: ``mean((d_fake - real_label)^2)``;
    ``hinge``: ``-mean(d_fake)``.
    """
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_scores,
                                                  torch.full_like(fake_scores, real_label))
    if kind == "lsgan":
        return (fake_scores - real_label).pow(2).mean()
    if kind == "hinge":
        return -fake_scores.mean()
    raise unknown_choice("GAN loss", kind, GAN_LOSSES)


@DISTILLERS.register("ADVKD")
class AdvKD(Distiller):
    """KD plus an adversarial term from a discriminator on the outputs.

    The forward computes the student's losses with D frozen (and in eval
    mode, so that spectral normalisation's power iteration does not move);
    then, after the student's update, the trainer runs the declared
    ``discriminator`` phase: ``d_steps`` updates of D with its own Adam, in
    fp32, on the step's detached inputs (:meth:`extra_phases`)::

        loss_ce  = ce_weight * CE
        loss_kd  = kd_weight * KD(T)
        loss_adv = lambda(epoch) * generator_loss(D(student input))
        lambda(epoch) = adv_weight * min(epoch / warmup_epochs, 1)   (adv_weight if warm-up 0)

    With ``adv_weight`` 0, ``loss_ce`` and ``loss_kd`` are exactly KD's and
    ``loss_adv`` is 0. The trainer schedules and checkpoints D's optimizer
    (:meth:`auxiliary_optimizers`); DDP leaves D alone and the trainer
    averages its gradients over processes in the phase.

    What D sees (``input_kind``):

    * ``"logits"``: the raw logits; ``"probs"``: their softmax at temperature 1;
    * ``"feature"``: the pooled features mapped to ``num_classes`` wide vectors.
      The student's map is a trainable linear layer that trains with the
      student (it is part of the generator). The teacher's map is a linear
      layer *frozen* at its random initialisation: it defines the "real"
      distribution, which must stay put for the game to have an equilibrium.
      Were D's optimizer to train it, D could move the real samples away from
      the fakes at will (a bias suffices), and the student could never catch
      up; the student's optimizer would give it no gradient at all.

    Example::

        advkd = AdvKD(student, teacher, num_classes=100, adv_weight=0.5, gan_loss="hinge")
        advkd.train().on_epoch_start(1)
        logits, losses = advkd(image, target)   # computes only; the trainer then
        # updates the student, runs the "discriminator" phase and after_step
        # (mdistill.engine.update_rules.commit_step)

    Args:
        student, teacher: the models.
        num_classes: width of the vector D sees.
        temperature, ce_weight, kd_weight: the KD part.
        adv_weight, warmup_epochs: the adversarial weight and its linear warm-up (epochs).
        input_kind: ``"logits"``, ``"probs"`` or ``"feature"``.
        gan_loss: ``"bce"``, ``"lsgan"`` or ``"hinge"``.
        d_steps: discriminator updates per student step.
        real_label: target for "real" in bce/lsgan (below 1: one-sided label smoothing).
        hidden, spectral_norm: D's hidden widths and spectral normalisation.
        d_lr, d_betas, d_weight_decay: D's Adam settings.
        image_shape: input shape used to probe feature widths (``"feature"`` input).

    Raises:
        UserError: an unknown ``gan_loss`` or ``input_kind``.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def __init__(self, student, teacher, num_classes, temperature=4.0, ce_weight=0.1,
                 kd_weight=0.9, adv_weight=0.5, warmup_epochs=20, input_kind="logits",
                 gan_loss="bce", d_steps=1, real_label=1.0, hidden=(256, 128),
                 spectral_norm=False, d_lr=1e-4, d_betas=(0.5, 0.999), d_weight_decay=0.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        if gan_loss not in GAN_LOSSES:
            raise unknown_choice("ADVKD.GAN_LOSS", gan_loss, GAN_LOSSES)
        if input_kind not in INPUTS:
            raise unknown_choice("ADVKD.INPUT", input_kind, INPUTS)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.adv_weight = adv_weight
        self.warmup_epochs = warmup_epochs
        self.input_kind = input_kind
        self.gan_loss = gan_loss
        self.d_steps = d_steps
        self.real_label = real_label
        if input_kind == "feature":
            self.teacher_reads = self.teacher_reads | {"pooled_feat"}
            self.student_reads = self.student_reads | {"pooled_feat"}
            (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
            self.student_adapter = nn.Linear(student_feats["pooled_feat"].shape[1], num_classes)
            self.teacher_adapter = FixedProjection(teacher_feats["pooled_feat"].shape[1],
                                                   num_classes)
        self.discriminator = Discriminator(num_classes, hidden, spectral_norm)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=d_lr,
                                            betas=tuple(d_betas), weight_decay=d_weight_decay)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        options = cfg.ADVKD
        size = getattr(data_info, "image_size", 32)
        num_classes = getattr(data_info, "num_classes", None)
        if num_classes is None:
            num_classes = probe_features(student, (3, size, size))[0].shape[1]
        return cls(student, teacher, num_classes, temperature=options.TEMPERATURE,
                   ce_weight=options.LOSS.CE_WEIGHT, kd_weight=options.LOSS.KD_WEIGHT,
                   adv_weight=options.LOSS.ADV_WEIGHT, warmup_epochs=options.ADV_WARMUP_EPOCHS,
                   input_kind=options.INPUT, gan_loss=options.GAN_LOSS, d_steps=options.D_STEPS,
                   real_label=options.REAL_LABEL, hidden=tuple(options.DISC.HIDDEN),
                   spectral_norm=options.DISC.SPECTRAL_NORM, d_lr=options.DISC_OPT.LR,
                   d_betas=tuple(options.DISC_OPT.BETAS),
                   d_weight_decay=options.DISC_OPT.WEIGHT_DECAY, image_shape=(3, size, size))

    # ------------------------------------------------------------ declarations
    def teacher_temperatures(self):
        # KD softens at T; D reads the teacher's raw logits, or its softmax at 1.
        return (self.temperature, 1.0) if self.input_kind == "probs" else None

    def extra_phases(self):
        # D: its own Adam, stepped after the student's update, left alone by DDP.
        return [Phase("discriminator", self.d_optimizer, self.discriminator_phase_loss,
                      self.d_steps)]

    def adversarial_weight(self, epoch=None):
        """``lambda(epoch) = adv_weight * min(epoch / warmup_epochs, 1)``; the current
        epoch (from :meth:`on_epoch_start`) when ``epoch`` is None."""
        epoch = self.epoch if epoch is None else epoch
        if self.warmup_epochs <= 0:
            return self.adv_weight
        return self.adv_weight * min(epoch / self.warmup_epochs, 1.0)

    # ------------------------------------------------------------------ steps
    def discriminator_input(self, logits, feats, side):
        """The fp32 vector D sees for ``side`` ("student" or "teacher")."""
        if self.input_kind == "logits":
            return logits.float()
        if self.input_kind == "probs":
            return F.softmax(logits.float(), dim=1)
        adapter = self.student_adapter if side == "student" else self.teacher_adapter
        return adapter(feats["pooled_feat"].float())

    def discriminator_phase_loss(self):
        """D's loss on the step's detached inputs (the ``discriminator`` phase).

        Also logs ``d_loss`` and the fractions of real called real
        (``d_acc_teacher``) and fake called fake (``d_acc_student``), from the
        scores D gives before this update.
        """
        real, fake = self.stashed["real"], self.stashed["fake"]
        with torch.autocast(real.device.type, enabled=False):
            real_scores = self.discriminator(real)
            fake_scores = self.discriminator(fake)
            loss = discriminator_loss(real_scores, fake_scores, self.gan_loss, self.real_label)
        # The score halfway between D's targets for real and fake.
        threshold = self.real_label / 2 if self.gan_loss == "lsgan" else 0.0
        self.log_diagnostic("d_loss", loss)
        self.log_diagnostic("d_acc_teacher", (real_scores.detach() > threshold).float().mean())
        self.log_diagnostic("d_acc_student", (fake_scores.detach() <= threshold).float().mean())
        return loss

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        weight = self.adversarial_weight()
        # D and the adversarial term in fp32: D's scores feed exp/log in the GAN losses.
        with torch.autocast(image.device.type, enabled=False):
            fake = self.discriminator_input(logits, feats, "student")
            real = self.discriminator_input(teacher_logits, teacher_feats, "teacher")
            self.stash(real=real.detach(), fake=fake.detach())
            # D frozen: the student's gradient flows through it, D's own does not.
            was_training = self.discriminator.training
            self.discriminator.requires_grad_(False).eval()
            try:
                adversarial = generator_loss(self.discriminator(fake), self.gan_loss,
                                             self.real_label)
            finally:
                self.discriminator.requires_grad_(True).train(was_training)
        self.log_diagnostic("adv_weight", weight)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature),
            "loss_adv": weight * adversarial,
        }
