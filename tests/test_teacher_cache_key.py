"""The teacher cache's key sees the libraries and the code the teacher's logits come from:
another torchvision, timm or model code is another cache file, never a stale read."""
import importlib
import os
import sys
from importlib import metadata

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.engine.builder import build_experiment
from mdistill.engine.teacher_cache import build_teacher_cache, code_fingerprint

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


@pytest.fixture()
def kd(cifar_root, teacher_file, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "DISTILLER.TEACHER_CACHE", str(tmp_path / "cache"))
    return build_experiment(load_cfg(CONFIG, opts))


def cache_path(experiment):
    cache, _ = build_teacher_cache(experiment.cfg, experiment.distiller, experiment.data,
                                   experiment.train_loader, experiment.device)
    cache.close()
    return cache.path


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_another_library_version_is_another_cache_file(kd, package, monkeypatch):
    before = cache_path(kd)
    assert cache_path(kd) == before                       # the same run finds its file
    real = metadata.version

    def version(name):
        return "0.0.1+other" if name == package else real(name)
    monkeypatch.setattr(metadata, "version", version)
    assert cache_path(kd) != before


def test_a_library_not_installed_is_keyed_as_absent(kd, monkeypatch):
    before = cache_path(kd)
    real = metadata.version

    def version(name):
        if name == "timm":
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "version", version)
    assert cache_path(kd) != before


class RescaledLinear(nn.Linear):
    """nn.Linear whose forward a new version of the model code changed."""

    def forward(self, input):
        return super().forward(input) * 2


def test_another_class_in_the_teacher_is_another_cache_file(kd):
    before = cache_path(kd)
    teacher = kd.distiller.teacher
    old = teacher.fc
    new = RescaledLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    teacher.fc = new            # the same weights: only the code differs
    assert cache_path(kd) != before


MODEL = '''
import torch
from torch import nn

def scale():
    return {scale}

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * scale(), {{}}
'''


def test_an_edited_model_file_changes_the_code_fingerprint(tmp_path, monkeypatch):
    """The same class name and weights; the file now scales differently (in a helper
    beside the class, which the class's own source would not show)."""
    (tmp_path / "tiny_model_code.py").write_text(MODEL.format(scale=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tiny_model_code")
    torch.manual_seed(0)
    first = module.Tiny()
    before = code_fingerprint(first)
    assert code_fingerprint(module.Tiny()) == before
    (tmp_path / "tiny_model_code.py").write_text(MODEL.format(scale=0.5))
    importlib.invalidate_caches()
    module = importlib.reload(module)
    try:
        second = module.Tiny()
        assert code_fingerprint(second) != before
    finally:
        sys.modules.pop("tiny_model_code", None)


def test_a_class_without_source_counts_by_its_name():
    Anonymous = type("Anonymous", (nn.Module,), {"__module__": "nowhere_to_be_found"})
    Other = type("Other", (nn.Module,), {"__module__": "nowhere_to_be_found"})
    assert code_fingerprint(Anonymous()) == code_fingerprint(Anonymous())
    assert code_fingerprint(Anonymous()) != code_fingerprint(Other())
