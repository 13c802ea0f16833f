"""torchvision's datasets, image folders, training subsets and the validation split,
each read from small data written here in the real on-disk formats."""
import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_opts
from mdistill.config import load_cfg
from mdistill.data import DATASETS, ImageTensorDataset, apply_split_options, build_dataset
from mdistill.data import vision
from mdistill.data.subsets import IndexedSubset
from mdistill.engine.builder import build_experiment
from mdistill.analysis.compare import load_runs
from mdistill.engine.launch import train
from mdistill.errors import UserError


def write_idx(path, array):
    """An IDX file as LeCun's MNIST files are: magic 0x08 (uint8), dims, big-endian."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


def mnist_arrays(num_train=40, num_test=20, seed=0):
    generator = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", num_train), ("t10k", num_test)):
        arrays[split] = (generator.integers(1, 256, (count, 28, 28), dtype=np.uint8),
                         np.arange(count, dtype=np.uint8) % 10)
    return arrays


def write_mnist_raw(folder, arrays, suffix=""):
    os.makedirs(folder, exist_ok=True)
    for split, (images, labels) in arrays.items():
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), labels)


@pytest.mark.parametrize("name, folder, classes", [
    ("mnist", "MNIST", "0 - zero"), ("fashion_mnist", "FashionMNIST", "T-shirt/top"),
    ("kmnist", "KMNIST", "o")])
def test_mnist_family_pads_28_to_32_and_repeats_grey(tmp_path, name, folder, classes):
    arrays = mnist_arrays()
    write_mnist_raw(str(tmp_path / folder / "raw"), arrays)
    data = build_dataset(name, str(tmp_path), download=False)
    assert data.num_classes == 10 and data.class_names[0] == classes
    assert isinstance(data.train, ImageTensorDataset)
    images = data.train.images
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    original = torch.from_numpy(arrays["train"][0])
    for channel in range(3):
        assert torch.equal(images[:, channel, 2:30, 2:30], original)
    border = images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0          # the padding is background
    assert torch.equal(data.test.targets, torch.arange(20) % 10)
    # Statistics of the padded training images, in float64 from the pixels.
    pixels = images.double() / 255
    assert data.mean == pytest.approx([pixels.mean().item()] * 3, abs=1e-4)
    assert data.std == pytest.approx([pixels.std(unbiased=False).item()] * 3, abs=1e-4)
    assert data.hflip == (name == "fashion_mnist")


def test_mnist_image_size_resizes(tmp_path):
    write_mnist_raw(str(tmp_path / "MNIST" / "raw"), mnist_arrays())
    data = build_dataset("mnist", str(tmp_path), image_size=64)
    assert data.train.images.shape == (40, 3, 64, 64) and data.image_size == 64


def test_fashion_mnist_comes_from_the_debian_package_when_missing(tmp_path, monkeypatch):
    package = tmp_path / "usr_share"
    arrays = mnist_arrays(seed=3)
    write_mnist_raw(str(package), arrays, suffix=".gz")
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST", str(package))
    root = tmp_path / "data"
    data = build_dataset("fashion_mnist", str(root), download=False)
    assert sorted(os.listdir(root / "FashionMNIST" / "raw")) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte"]
    assert torch.equal(data.train.images[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train"][0]))


def test_missing_mnist_names_the_file_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"FashionMNIST.raw.train-images-idx3-ubyte is missing.*"
                                        r"apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", str(tmp_path), download=False)


def test_cifar10_reads_torchvision_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    generator = np.random.default_rng(1)
    written = {}
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for position, name in enumerate(names):
        data = generator.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(position + row) % 10 for row in range(4)]
        written[name] = (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, handle)
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": label_names, "num_vis": 3072}, handle)
    data = build_dataset("cifar10", str(tmp_path))
    assert data.class_names == tuple(label_names)
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    # Rows are channel-major: the first 1024 bytes are the red plane.
    first = written["data_batch_1"][0][0]
    assert torch.equal(data.train.images[0, 0].flatten(), torch.from_numpy(first[:1024]))
    assert torch.equal(data.train.images[4, 2].flatten(),
                       torch.from_numpy(written["data_batch_2"][0][0][2048:]))
    assert data.train.targets[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert data.test.targets.tolist() == [5, 6, 7, 8]


def test_svhn_reads_the_mat_files_and_maps_10_to_0(tmp_path):
    from scipy.io import savemat
    generator = np.random.default_rng(2)
    images = {}
    for split, count in (("train", 6), ("test", 3)):
        images[split] = generator.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        labels = np.array([[10], [1], [2], [3], [9], [10]][:count], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": images[split], "y": labels})
    data = build_dataset("svhn", str(tmp_path))
    assert data.train.targets.tolist() == [0, 1, 2, 3, 9, 0]
    assert data.test.targets.tolist() == [0, 1, 2]
    # X is [H, W, C, N]: image n, channel c, row y, column x is X[y, x, c, n].
    assert int(data.train.images[4, 1, 7, 20]) == int(images["train"][7, 20, 1, 4])
    assert data.hflip is False


def test_stl10_reads_column_major_planes_and_resizes(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    generator = np.random.default_rng(4)
    planes = {}
    for split, count in (("train", 3), ("test", 2)):
        # An image as it should come out: [3, 96 rows, 96 columns].
        planes[split] = generator.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        # The file stores each plane column by column.
        planes[split].transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        np.array([1, 10, 3][:count], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]))
    data = build_dataset("stl10", str(tmp_path))
    assert torch.equal(data.train.images, torch.from_numpy(planes["train"]))
    assert data.train.targets.tolist() == [0, 9, 2] and data.class_names[9] == "truck"
    small = build_dataset("stl10", str(tmp_path), image_size=32)
    assert small.train.images.shape == (3, 3, 32, 32) and small.image_size == 32


# ------------------------------------------------------------- image folders
def write_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=(12, 10), splits=None):
    """PNG images whose red channel encodes the class and green the image number."""
    for split in splits or ("train", "val"):
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for number in range(per_class):
                pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                pixels[..., 0] = 40 * label + 10
                pixels[..., 1] = 20 * number
                pixels[..., 2] = 200 if split == "train" else 100
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{number}.png"))


def test_image_folder_small_images_are_held_in_memory(tmp_path):
    write_folder(str(tmp_path), size=(16, 16))
    data = build_dataset("imagefolder", str(tmp_path), num_workers=0)
    assert data.class_names == ("cat", "dog", "eel") and data.num_classes == 3
    assert data.image_size == 16                    # the first image's size
    assert isinstance(data.train, ImageTensorDataset)   # the device loader augments it
    images, targets = data.train.images, data.train.targets
    assert images.shape == (12, 3, 16, 16)
    assert targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert images[:, 0, 0, 0].tolist() == [10] * 4 + [50] * 4 + [90] * 4
    assert images[:, 1, 0, 0].tolist() == [0, 20, 40, 60] * 3
    assert set(data.test.images[:, 2].flatten().tolist()) == {100}
    pixels = images.double() / 255
    expected_mean = pixels.mean(dim=(0, 2, 3))
    expected_std = pixels.std(dim=(0, 2, 3), unbiased=False)
    assert data.mean == pytest.approx(expected_mean.tolist(), abs=1e-4)
    assert data.std == pytest.approx(expected_std.tolist(), abs=1e-4)


def test_image_folder_resizes_to_image_size(tmp_path):
    write_folder(str(tmp_path), size=(20, 10))
    data = build_dataset("imagefolder", str(tmp_path), image_size=8, num_workers=0)
    assert data.train.images.shape == (12, 3, 8, 8)


def test_image_folder_large_images_take_the_imagenet_recipe(tmp_path):
    write_folder(str(tmp_path), size=(50, 40))
    data = build_dataset("imagefolder", str(tmp_path), image_size=36, num_workers=0,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert not isinstance(data.train, ImageTensorDataset)     # decoded per sample
    item = data.train[5]
    assert item["image"].shape == (3, 36, 36) and item["image"].dtype == torch.uint8
    assert item["target"] == 1 and item["index"] == 5
    test_item = data.test[0]
    assert test_item["image"].shape == (3, 36, 36)
    assert set(test_item["image"][2].flatten().tolist()) == {100}   # centre crop, no jitter
    assert data.mean == (0.5, 0.5, 0.5) and data.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_image_folder_names_the_class_missing_from_val(tmp_path):
    write_folder(str(tmp_path))
    write_folder(str(tmp_path), classes=("fox",), splits=("train",))
    with pytest.raises(UserError, match=r"class 'fox' is in .*train but not in .*val"):
        build_dataset("imagefolder", str(tmp_path))


def test_image_folder_without_val_says_what_it_expects(tmp_path):
    write_folder(str(tmp_path), splits=("train",))
    with pytest.raises(UserError, match=r"expected .*val with one sub-folder of images per class"):
        build_dataset("imagefolder", str(tmp_path))


def test_every_new_dataset_is_registered():
    for name in ("imagefolder", "mnist", "fashion_mnist", "kmnist", "cifar10", "svhn", "stl10"):
        assert name in DATASETS


# ----------------------------------------------------------- subsets and val
def labelled_splits(per_class=(6, 5, 7)):
    from mdistill.data import DatasetSplits
    targets = torch.cat([torch.full((count,), label) for label, count in enumerate(per_class)])
    images = torch.arange(targets.numel()).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
    train = ImageTensorDataset(images.contiguous(), targets)
    return DatasetSplits(train=train, test=train, num_classes=len(per_class),
                         train_targets=targets, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=2)


def test_train_per_class_is_stratified_and_depends_on_the_subset_seed_only():
    data = labelled_splits()
    first = apply_split_options(data, per_class=3, seed=0)
    again = apply_split_options(data, per_class=3, seed=0)
    other = apply_split_options(data, per_class=3, seed=1)
    assert torch.bincount(first.train_targets).tolist() == [3, 3, 3]
    assert torch.equal(first.train.images, again.train.images)
    assert not torch.equal(first.train.images, other.train.images)
    # Each kept image keeps its own label (the images encode their position).
    positions = first.train.images[:, 0, 0, 0].long()
    assert torch.equal(data.train_targets[positions], first.train_targets)
    assert first.num_train == 9 and first.val is None


def test_train_fraction_keeps_a_share_of_each_class():
    subset = apply_split_options(labelled_splits((10, 20, 4)), fraction=0.5, seed=0)
    assert torch.bincount(subset.train_targets).tolist() == [5, 10, 2]


def test_val_fraction_holds_out_part_of_each_class_disjoint_from_training():
    data = labelled_splits((10, 20, 4))
    split = apply_split_options(data, val_fraction=0.25, seed=0)
    assert torch.bincount(split.val.targets).tolist() == [2, 5, 1]
    train_ids = set(split.train.images[:, 0, 0, 0].tolist())
    val_ids = set(split.val.images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 34
    assert split.test is data.test


def test_subsets_of_folder_datasets_are_reindexed(tmp_path):
    write_folder(str(tmp_path), size=(40, 40), per_class=4)
    data = build_dataset("imagefolder", str(tmp_path), image_size=36, num_workers=0,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    split = apply_split_options(data, per_class=3, val_fraction=0.34, seed=0)
    assert isinstance(split.train, IndexedSubset) and len(split.train) == 6
    assert [split.train[i]["index"] for i in range(6)] == list(range(6))
    assert [split.train[i]["target"] for i in range(6)] == split.train_targets.tolist()
    # The validation images are read with the test transform: a centre crop, no jitter.
    val_item = split.val[0]
    assert set(val_item["image"][2].flatten().tolist()) == {200}
    assert torch.equal(val_item["image"], split.val[0]["image"])


@pytest.mark.parametrize("options, message", [
    ({"per_class": 3, "fraction": 0.5}, "not both"),
    ({"fraction": 1.5}, "TRAIN_FRACTION must lie in"),
    ({"val_fraction": 1.0}, "VAL_FRACTION must lie in"),
    ({"per_class": 1, "val_fraction": 0.5}, "at least two training images of every class"),
])
def test_split_options_refuse_bad_values(options, message):
    with pytest.raises(UserError, match=message):
        apply_split_options(labelled_splits(), **options)


def test_image_size_on_a_fixed_size_dataset_is_refused(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "DATASET.IMAGE_SIZE", "64")
    with pytest.raises(UserError, match="DATASET.IMAGE_SIZE is not an option of dataset "
                                        "'cifar100'"):
        build_experiment(load_cfg(None, opts))


def test_dataset_mean_and_std_replace_the_datasets_own(cifar_root, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "DATASET.MEAN", "[0.1, 0.2, 0.3]", "DATASET.STD", "[1, 1, 1]")
    experiment = build_experiment(load_cfg(None, opts))
    assert experiment.data.mean == (0.1, 0.2, 0.3) and experiment.data.std == (1, 1, 1)
    batch = next(iter(experiment.test_loader))
    raw = experiment.data.test.images[:batch["image"].shape[0]].float() / 255
    expected = raw - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(batch["image"], expected, atol=1e-6)


def test_validation_split_chooses_best_and_test_only_reports(tmp_path):
    """A run with DATASET.VAL_FRACTION: student_best is the epoch best on the
    validation split, and compare reports that epoch's test accuracy."""
    arrays = mnist_arrays(num_train=200, num_test=40, seed=5)
    root = tmp_path / "data"
    write_mnist_raw(str(root / "MNIST" / "raw"), arrays)
    opts = ["DATASET.TYPE", "mnist", "DATASET.ROOT", str(root), "DATASET.NUM_WORKERS", "0",
            "DATASET.TRAIN_PER_CLASS", "12", "DATASET.VAL_FRACTION", "0.25", "DEVICE", "cpu",
            "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", "resnet8", "SOLVER.BATCH_SIZE", "16",
            "SOLVER.EPOCHS", "3", "SOLVER.LR", "0.2", "LOG.PREFIX", str(tmp_path / "runs"),
            "EXPERIMENT.PROJECT", "val", "EXPERIMENT.NAME", "run"]
    data = build_experiment(load_cfg(None, opts)).data
    # 12 per class, 3 of each held out: 90 training and 30 validation images.
    assert data.num_train == 90 and len(data.val) == 30
    run_dir, history = train(None, opts)
    assert all("val" in record for record in history)
    chosen = max(reversed(history), key=lambda record: record["val"]["top1"])
    best = torch.load(os.path.join(run_dir, "student_best"), weights_only=True)
    assert best["epoch"] == chosen["epoch"]
    assert best["val_acc"] == chosen["val"]["top1"] and best["test_acc"] == chosen["test"]["top1"]
    with open(os.path.join(run_dir, "log.txt")) as handle:
        assert f"of the best on validation (epoch {chosen['epoch']}" in handle.read()
    run = load_runs([run_dir])[0]
    assert run.best_top1 == chosen["test"]["top1"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert [record["val"]["top1"] for record in records] == [r["val"]["top1"] for r in history]
    # The best chosen on validation is tagged as validation's, not as the test set's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(run_dir).Reload().Tags()["scalars"]
    assert "val/best_top1" in tags and "test/best_top1" not in tags
