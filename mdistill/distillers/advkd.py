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
from ..utils.dist import average_gradients
from .base import Distiller, kd_loss, probe_features

GAN_LOSSES = ("bce", "lsgan", "hinge")
INPUTS = ("logits", "probs", "feature")


class Discriminator(nn.Module):
    """MLP on a class vector: widths -> hidden... -> 1 logit, LeakyReLU(0.2), no BN."""

    def __init__(self, in_features, hidden=(256, 128), spectral_norm=False):
        super().__init__()
        layers, width = [], in_features
        for size in list(hidden) + [1]:
            linear = nn.Linear(width, size)
            layers.append(nn.utils.parametrizations.spectral_norm(linear) if spectral_norm
                          else linear)
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width = size
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.net(x).squeeze(1)


def discriminator_loss(real_scores, fake_scores, kind, real_label=1.0):
    """D's loss: teacher outputs are real, student outputs fake."""
    if kind == "bce":
        real = F.binary_cross_entropy_with_logits(real_scores, torch.full_like(real_scores,
                                                                               real_label))
        fake = F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))
        return real + fake
    if kind == "lsgan":
        return (real_scores - real_label).pow(2).mean() + fake_scores.pow(2).mean()
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def generator_loss(fake_scores, kind, real_label=1.0):
    """The student's loss for D's verdict on its outputs: be taken for real."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_scores, torch.full_like(fake_scores,
                                                                               real_label))
    if kind == "lsgan":
        return (fake_scores - real_label).pow(2).mean()
    return -fake_scores.mean()


@DISTILLERS.register("ADVKD")
class AdvKD(Distiller):
    """KD plus an adversarial term from a discriminator on the outputs.

    Every training step first updates D (``d_steps`` times, on detached
    inputs, fp32, its own Adam), then computes the student's losses with D
    frozen: ``ce_weight * CE + kd_weight * KD(T) + lambda(epoch) * adversarial``
    with ``lambda(epoch) = adv_weight * min(epoch / warmup_epochs, 1)``.
    With ``adv_weight`` 0 the student's losses are exactly KD's.

    Args:
        student, teacher: the models.
        num_classes: width of the class vector D sees.
        temperature, ce_weight, kd_weight: the KD part.
        adv_weight, warmup_epochs: the adversarial weight and its linear warm-up.
        input_kind: "logits", "probs" (softmax) or "feature" (pooled features
            through a linear adapter per model to ``num_classes``; the student's
            adapter trains with the student, the teacher's with D).
        gan_loss: "bce", "lsgan" or "hinge".
        d_steps: discriminator updates per student step.
        real_label: target for "real" (below 1: one-sided label smoothing).
        hidden, spectral_norm: D's hidden widths and spectral normalisation.
        d_lr, d_betas, d_weight_decay: D's Adam settings.
        image_shape: input shape used to probe feature widths ("feature" input).
    """

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
            _, student_feats = probe_features(student, image_shape)
            _, teacher_feats = probe_features(teacher, image_shape)
            self.student_adapter = nn.Linear(student_feats["pooled_feat"].shape[1], num_classes)
            self.teacher_adapter = nn.Linear(teacher_feats["pooled_feat"].shape[1], num_classes)
        self.discriminator = Discriminator(num_classes, hidden, spectral_norm)
        d_params = list(self.discriminator.parameters())
        if input_kind == "feature":
            d_params += list(self.teacher_adapter.parameters())
        self.d_optimizer = torch.optim.Adam(d_params, lr=d_lr, betas=tuple(d_betas),
                                            weight_decay=d_weight_decay)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        options = cfg.ADVKD
        size = getattr(data_info, "image_size", 32)
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
    def auxiliary_module_names(self):
        names = ["discriminator"]
        return names + (["teacher_adapter"] if self.input_kind == "feature" else [])

    def auxiliary_optimizers(self):
        return {"discriminator": self.d_optimizer}

    def ddp_ignored_names(self):
        # D is stepped here, with its gradients averaged over processes explicitly.
        names = super().ddp_ignored_names()
        for module_name in self.auxiliary_module_names():
            module = getattr(self, module_name)
            names += [f"{module_name}.{name}" for name, _ in module.named_parameters()]
            names += [f"{module_name}.{name}" for name, _ in module.named_buffers()]
        return names

    def adversarial_weight(self, epoch=None):
        """lambda(epoch) = adv_weight * min(epoch / warmup_epochs, 1)."""
        epoch = self.epoch if epoch is None else epoch
        if self.warmup_epochs <= 0:
            return self.adv_weight
        return self.adv_weight * min(epoch / self.warmup_epochs, 1.0)

    # ------------------------------------------------------------------ steps
    def _d_input(self, logits, feats, side):
        if self.input_kind == "logits":
            return logits.float()
        if self.input_kind == "probs":
            return F.softmax(logits.float(), dim=1)
        adapter = self.student_adapter if side == "student" else self.teacher_adapter
        return adapter(feats["pooled_feat"].float())

    def discriminator_step(self, real, fake):
        """One D update on detached inputs; returns (loss, acc on real, acc on fake)."""
        self.d_optimizer.zero_grad(set_to_none=True)
        real_scores = self.discriminator(real)
        fake_scores = self.discriminator(fake)
        loss = discriminator_loss(real_scores, fake_scores, self.gan_loss, self.real_label)
        loss.backward()
        average_gradients([p for group in self.d_optimizer.param_groups for p in group["params"]])
        self.d_optimizer.step()
        threshold = 0.0 if self.gan_loss in ("bce", "hinge") else 0.5
        return (loss.detach(), (real_scores > threshold).float().mean(),
                (fake_scores <= threshold).float().mean())

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        with torch.autocast(image.device.type, enabled=False):
            fake = self._d_input(logits, feats, "student")
            for _ in range(self.d_steps):
                # No gradient reaches the teacher (its outputs came without autograd); in
                # "feature" mode the teacher's adapter, which D's optimizer owns, gets one.
                real = self._d_input(teacher_logits, teacher_feats, "teacher")
                d_loss, real_acc, fake_acc = self.discriminator_step(real, fake.detach())
            self.discriminator.requires_grad_(False)
            try:
                adversarial = generator_loss(self.discriminator(fake), self.gan_loss,
                                             self.real_label)
            finally:
                self.discriminator.requires_grad_(True)
        weight = self.adversarial_weight()
        self.log_diagnostic("d_loss", d_loss)
        self.log_diagnostic("d_acc_teacher", real_acc)
        self.log_diagnostic("d_acc_student", fake_acc)
        self.log_diagnostic("adv_weight", weight)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature),
            "loss_adv": weight * adversarial,
        }
