"""Shared fixtures: tiny datasets in the real on-disk formats, teacher files."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A 100-class CIFAR-100 folder (160 train / 80 test images) in the real format."""
    from mdistill.data import write_cifar100
    root = tmp_path_factory.mktemp("cifar")
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(160) % 100
    # Class-dependent brightness so a model can learn something in a few steps.
    train = (torch.randint(0, 64, (160, 3, 32, 32), generator=generator, dtype=torch.uint8)
             + (labels.view(-1, 1, 1, 1) * 1.9).to(torch.uint8))
    test_labels = torch.arange(80) % 100
    test = (torch.randint(0, 64, (80, 3, 32, 32), generator=generator, dtype=torch.uint8)
            + (test_labels.view(-1, 1, 1, 1) * 1.9).to(torch.uint8))
    write_cifar100(str(root), train=(train, labels), test=(test, test_labels))
    return str(root)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A resnet20 teacher saved in mdistiller's layout ({"model": state_dict})."""
    from mdistill.models import build_model
    folder = tmp_path_factory.mktemp("teachers") / "resnet20_vanilla"
    folder.mkdir()
    torch.manual_seed(1)
    model = build_model("resnet20", 100)
    path = folder / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: more only add overhead (and
    contend on shared CPUs). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_opts(cifar_root, prefix, *extra):
    """Overrides for a fast CPU run on the tiny CIFAR folder."""
    return ["DATASET.ROOT", cifar_root, "DATASET.DOWNLOAD", "False", "DATASET.NUM_WORKERS", "0",
            "DEVICE", "cpu", "SOLVER.BATCH_SIZE", "32", "DATASET.TEST.BATCH_SIZE", "40",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "LOG.PREFIX", str(prefix),
            "LOG.TENSORBOARD_FREQ", "1", "LOG.SAVE_CHECKPOINT_FREQ", "2", *extra]
