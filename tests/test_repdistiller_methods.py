"""RepDistiller's CC, FSP, AB and FT against their formulas, and their stages.

Expected values are computed here in float64 numpy from the formulas of
RepDistiller's ``distiller_zoo`` (the benchmark these methods are known by),
independently of the implementation. The models are fakes returning fixed
features (times a unit parameter, so gradients have somewhere to go), or the
real CIFAR models where shapes matter.
"""
import numpy as np
import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedFeatures(nn.Module):
    """Fixed logits, feature maps and pooled features (first ``len(x)`` rows) times a
    unit parameter; ``preact`` maps may differ from the post-ReLU ones."""

    def __init__(self, logits, feats=(), pooled=None, preact=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)   # noqa: E731
        self.register_buffer("logits", as_tensor(logits))
        self.register_buffer("pooled", as_tensor(pooled if pooled is not None else logits))
        self.feats = [as_tensor(f) for f in feats]
        self.preact = [as_tensor(f) for f in (preact if preact is not None else feats)]

    def forward(self, x):
        n = len(x)
        return self.logits[:n] * self.scale, {
            "feats": [f[:n] * self.scale for f in self.feats],
            "preact_feats": [f[:n] * self.scale for f in self.preact],
            "pooled_feat": self.pooled[:n] * self.scale}


def losses_of(distiller, batch):
    distiller.train()
    _, losses = distiller.forward_train(torch.zeros(batch, 3, 4, 4), torch.zeros(batch).long())
    return {name: float(value.detach()) for name, value in losses.items()}


# ------------------------------------------------------------------------- CC

def test_cc_matches_repdistillers_correlation_loss():
    rng = np.random.default_rng(0)
    student_pooled, teacher_pooled = rng.normal(size=(5, 6)), rng.normal(size=(5, 4))
    logits = rng.normal(size=(5, 3))
    distiller = DISTILLERS.get("CC")(FixedFeatures(logits, pooled=student_pooled),
                                     FixedFeatures(logits, pooled=teacher_pooled),
                                     feat_dim=7, ce_weight=1.0, feat_weight=0.02,
                                     image_shape=(3, 4, 4))
    weights = {name: p.detach().double().numpy() for name, p in distiller.named_parameters()
               if name.startswith("embed")}
    e_s = student_pooled @ weights["embed_student.weight"].T + weights["embed_student.bias"]
    e_t = teacher_pooled @ weights["embed_teacher.weight"].T + weights["embed_teacher.bias"]
    delta = np.abs(e_s - e_t)
    expected = np.mean([np.sum(delta[i] * delta[i + 1]) for i in range(4)])
    assert losses_of(distiller, 5)["loss_feat"] == pytest.approx(0.02 * expected, rel=1e-5)
