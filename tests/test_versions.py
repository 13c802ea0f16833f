"""pyproject.toml's minimum versions are the ones the code needs.

Each row of NEEDS is an API the code calls, the first release that has it, and a
fragment of the source that shows the call: the row fails when the code stops
calling it (drop the row) and the floor must cover every row.
"""
import ast
import glob
import os
import re

import pytest

from conftest import ROOT

# package -> [(first version with it, what, source file, fragment of the call)]
NEEDS = {
    "torch": [
        ((2, 3), "torch.amp.GradScaler(device) (earlier: torch.cuda.amp only)",
         "mdistill/engine/trainer.py", "torch.amp.GradScaler("),
        ((2, 2), "nn.Module.compile() for SOLVER.COMPILE", "mdistill/engine/trainer.py",
         ".compile()"),
    ],
    "torchvision": [
        ((0, 13), "the weights enums (models.ResNet18_Weights, ...)",
         "mdistill/models/imagenet/resnet.py", "models.ResNet18_Weights"),
        ((0, 18), "the torchvision release built for torch 2.3 (each pins its torch)",
         "pyproject.toml", '"torch>=2.3"'),
    ],
    "timm": [
        ((1, 0), "forward_intermediates, the stage maps of timm:<name> models",
         "mdistill/models/external.py", "network.forward_intermediates("),
    ],
    "submitit": [
        ((1, 4, 6), "TorchDistributedEnvironment.export(..., overwrite=) for a job's tasks",
         "mdistill/analysis/sweep.py", "export(set_cuda_visible_devices=False, overwrite=True)"),
    ],
    "optuna": [
        ((3, 1), "JournalStorage with a file (JournalFileStorage; JournalFileBackend in 4.0)",
         "mdistill/analysis/tune.py", "optuna.storages.JournalFileStorage"),
    ],
    "matplotlib": [
        ((3, 5), "matplotlib.colormaps (tools/compare.py --plot)", "mdistill/analysis/plots.py",
         "from matplotlib import colormaps"),
    ],
}
PYTHON = (3, 9)


def release(parts):
    """``(major, minor, patch)`` from version parts, a missing patch as 0."""
    numbers = tuple(int(part) for part in parts)[:3]
    return numbers + (0,) * (3 - len(numbers))


def floors():
    """``{package: (major, minor)}`` from the ``>=`` pins in pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as handle:
        text = handle.read()
    found = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', text):
        found[name.lower()] = release(version.split("."))
    python = re.search(r'requires-python\s*=\s*">=([0-9.]+)"', text).group(1)
    found["python"] = tuple(int(part) for part in python.split(".")[:2])
    return found


@pytest.mark.parametrize("package", sorted(NEEDS))
def test_the_floor_is_the_newest_release_an_api_in_use_needs(package):
    for version, what, path, fragment in NEEDS[package]:
        with open(os.path.join(ROOT, path)) as handle:
            assert fragment in handle.read(), f"{path} no longer uses {what}: drop the row"
    needed = max(release(version) for version, *_ in NEEDS[package])
    assert floors()[package] == needed, (
        f"pyproject.toml pins {package}>={'.'.join(map(str, floors()[package]))}; the code "
        f"needs {'.'.join(map(str, needed))} "
        f"({[what for version, what, *_ in NEEDS[package] if release(version) == needed][0]})")


def test_the_installed_releases_have_the_apis():
    import torch
    import torchvision
    assert hasattr(torch.amp, "GradScaler") and hasattr(torch.nn.Module, "compile")
    assert hasattr(torchvision.models, "ResNet18_Weights")


def test_every_source_file_parses_as_the_oldest_python_allowed():
    assert floors()["python"] == PYTHON
    files = glob.glob(os.path.join(ROOT, "mdistill", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "tools", "*.py"))
    for path in files:
        with open(path) as handle:
            ast.parse(handle.read(), path, feature_version=PYTHON)
