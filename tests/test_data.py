"""Datasets, the device loader's augmentation and sharding, and CRD's sampler."""
import os
import pickle

import pytest
import torch
import torchvision.transforms.functional as TF

from mdistill.data import (ContrastiveSampler, ImageTensorDataset, build_dataset,
                           build_test_loader, build_train_loader, write_cifar100)
from mdistill.errors import UserError

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


def make_cifar(root, num_train=200, num_test=50):
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (num_train, 3, 32, 32), generator=generator, dtype=torch.uint8)
    test = torch.randint(0, 256, (num_test, 3, 32, 32), generator=generator, dtype=torch.uint8)
    train_labels = torch.arange(num_train) % 100
    test_labels = torch.arange(num_test) * 7 % 100
    write_cifar100(str(root), train=(train, train_labels), test=(test, test_labels))
    return train, train_labels, test, test_labels


def in_memory(num_samples=200, num_classes=10, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_samples, 3, size, size), generator=generator,
                           dtype=torch.uint8)
    return ImageTensorDataset(images, torch.arange(num_samples) % num_classes)


def normalized(images):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def collect(loader, limit=None):
    batches = []
    for batch in loader:
        batches.append({name: value.clone() for name, value in batch.items()})
        if limit is not None and len(batches) == limit:
            break
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name in one:
            assert torch.equal(one[name], other[name]), name


# ------------------------------------------------------------------ CIFAR-100
def test_cifar100_reads_what_was_written(tmp_path):
    train, train_labels, test, test_labels = make_cifar(tmp_path)
    train[5, 1, 2, 3] = 201          # green channel, row 2, column 3
    write_cifar100(str(tmp_path), train=(train, train_labels), test=(test, test_labels))
    with open(tmp_path / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    assert raw["data"].shape == (200, 3072)
    assert raw["data"][5, 1 * 1024 + 2 * 32 + 3] == 201    # channel-major rows
    assert {"filenames", "coarse_labels", "fine_labels"} <= raw.keys()

    data = build_dataset("cifar100", str(tmp_path), download=False)
    assert data.num_classes == 100 and data.image_size == 32
    assert data.mean == MEAN and data.std == STD
    assert torch.equal(data.train.images, train) and torch.equal(data.test.images, test)
    assert torch.equal(data.train.targets, train_labels)
    assert torch.equal(data.test.targets, test_labels)
    assert torch.equal(data.train_targets, train_labels) and data.num_train == 200
    assert data.train.images[5, 1, 2, 3] == 201
    assert data.class_names[0] == "apple" and len(data.class_names) == 100
    item = data.train[5]
    assert torch.equal(item["image"], train[5]) and item["target"] == train_labels[5]
    assert item["index"] == 5


def test_cifar100_missing_folder_names_the_path(tmp_path):
    with pytest.raises(UserError) as error:
        build_dataset("cifar100", str(tmp_path / "nowhere"), download=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "DATASET.DOWNLOAD" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_keys", "wrong_size"])
def test_cifar100_corrupt_pickle_names_the_file(tmp_path, damage):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    if damage == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        if damage == "wrong_keys":
            entry = {"images": entry["data"], "labels": entry["fine_labels"]}
        else:
            entry["data"] = entry["data"][:, :1000]
        with open(path, "wb") as handle:
            pickle.dump(entry, handle)
    with pytest.raises(UserError, match=str(path)):
        build_dataset("cifar100", str(tmp_path), download=False)


def test_cifar100_missing_file(tmp_path):
    make_cifar(tmp_path)
    os.remove(tmp_path / "cifar-100-python" / "test")
    with pytest.raises(UserError, match=os.path.join("cifar-100-python", "test")):
        build_dataset("cifar100", str(tmp_path), download=False)


def test_unknown_dataset_and_option():
    with pytest.raises(UserError, match="cifar100"):
        build_dataset("cifar1000", "data")
    with pytest.raises(UserError, match="num_train"):
        build_dataset("digits", "data", num_train=10)


# ------------------------------------------------------------- digits, synthetic
def test_digits_split_is_fixed():
    first = build_dataset("digits", None, download=False)
    second = build_dataset("digits", None, download=False)
    assert len(first.train) + len(first.test) == 1797
    assert first.num_classes == 10 and first.image_size == 32
    assert first.train.images.dtype == torch.uint8
    assert tuple(first.train.images.shape[1:]) == (3, 32, 32)
    assert torch.equal(first.train.images[:, 0], first.train.images[:, 2])  # grey
    assert int(first.train.images.max()) > 200
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.targets, second.test.targets)
    assert first.mean == second.mean and first.std == second.std
    assert set(first.test.targets.tolist()) == set(range(10))                # stratified
    assert abs(len(first.test) / 1797 - 0.25) < 0.01


def test_synthetic_is_seeded():
    options = dict(num_train=40, num_test=8, num_classes=5, image_size=16)
    first = build_dataset("synthetic", None, **options)
    second = build_dataset("synthetic", None, **options)
    assert tuple(first.train.images.shape) == (40, 3, 16, 16) and len(first.test) == 8
    assert int(first.train_targets.max()) < 5 and first.num_classes == 5
    assert torch.equal(first.train.images, second.train.images)
    assert not torch.equal(first.train.images[:8], first.test.images)
    with pytest.raises(UserError, match="NUM_TRAIN"):
        build_dataset("synthetic", None, num_train=0)


# -------------------------------------------------------------- augmentation
def coordinate_image():
    """Channel 0 holds row + 1, channel 1 column + 1: every pixel is unique and
    the zero padding (0, 0) is told apart from the image."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33).view(1, 32).expand(32, 32)
    return torch.stack([rows, cols, torch.full((32, 32), 99)]).to(torch.uint8)


def test_device_augmentation_matches_torchvision_crops():
    image = coordinate_image()
    draws = 8100
    dataset = ImageTensorDataset(image.expand(draws, -1, -1, -1).contiguous(),
                                 torch.zeros(draws, dtype=torch.long))
    loader = build_train_loader(dataset, 2025, "cpu", mean=MEAN, std=STD, seed=0)
    loader.set_epoch(1)
    padded = TF.pad(image, [4])
    tops, lefts, flips = [], [], []
    for batch in loader:
        std = torch.tensor(STD).view(1, 3, 1, 1)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        pixels = ((batch["image"] * std + mean) * 255).round().to(torch.uint8)
        for output in pixels:
            # The centre pixel always comes from the image; it fixes the crop.
            top = int(output[0, 16, 16]) - 13
            flip = int(output[1, 16, 17]) < int(output[1, 16, 16])
            left = int(output[1, 16, 16]) - (12 if flip else 13)
            expected = TF.crop(padded, top, left, 32, 32)
            if flip:
                expected = TF.hflip(expected)
            assert torch.equal(output, expected)
            tops.append(top)
            lefts.append(left)
            flips.append(flip)
    tops, lefts = torch.tensor(tops), torch.tensor(lefts)
    assert len(tops) == draws
    # Uniform offsets on both axes, jointly, and fair flips. With 8100 draws
    # the chi-square of the 81 cells (80 dof) is below 125 with p > 0.999.
    cells = torch.bincount(tops * 9 + lefts, minlength=81).double()
    assert cells.numel() == 81
    chi_square = float(((cells - 100) ** 2 / 100).sum())
    assert chi_square < 125, chi_square
    for axis in (tops, lefts):
        counts = torch.bincount(axis, minlength=9).double()
        assert float(((counts - 900) ** 2 / 900).sum()) < 27       # 8 dof, p = 0.001
    assert abs(sum(flips) / draws - 0.5) < 0.02


def test_normalisation_without_augmentation():
    dataset = in_memory(100)
    loader = build_train_loader(dataset, 32, "cpu", augment=False, mean=MEAN, std=STD)
    for batch in loader:
        expected = normalized(dataset.images[batch["index"]])
        assert batch["image"].dtype == torch.float32
        torch.testing.assert_close(batch["image"], expected, atol=1e-5, rtol=0)
        assert torch.equal(batch["target"], dataset.targets[batch["index"]])


def test_channels_last():
    loader = build_train_loader(in_memory(64), 16, "cpu", mean=MEAN, std=STD, channels_last=True)
    batch = next(iter(loader))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------- loaders
def test_epoch_covers_every_sample_once():
    loader = build_train_loader(in_memory(200), 64, "cpu", mean=MEAN, std=STD)
    loader.set_epoch(0)
    assert len(loader) == 4
    batches = collect(loader)
    assert [len(batch["index"]) for batch in batches] == [64, 64, 64, 8]
    indices = torch.cat([batch["index"] for batch in batches])
    assert torch.equal(indices.sort().values, torch.arange(200))
    assert not torch.equal(indices, torch.arange(200))          # shuffled
    dropping = build_train_loader(in_memory(200), 64, "cpu", mean=MEAN, std=STD, drop_last=True)
    assert len(dropping) == 3 and len(collect(dropping)) == 3


def test_two_ranks_have_equal_shards_covering_all():
    dataset = in_memory(201)
    shards = []
    for rank in range(2):
        loader = build_train_loader(dataset, 32, "cpu", mean=MEAN, std=STD, seed=3,
                                    rank=rank, world_size=2)
        loader.set_epoch(5)
        shards.append(torch.cat([batch["index"] for batch in collect(loader)]))
        assert len(loader) == 4
    assert len(shards[0]) == len(shards[1]) == 101
    assert set(torch.cat(shards).tolist()) == set(range(201))
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) <= 1   # the wrap padding


def test_epochs_are_reproducible_and_differ():
    dataset = in_memory(150)

    def epoch_batches(epoch, seed=0):
        loader = build_train_loader(dataset, 32, "cpu", mean=MEAN, std=STD, seed=seed)
        loader.set_epoch(epoch)
        return collect(loader)

    assert_same_batches(epoch_batches(2), epoch_batches(2))
    assert not torch.equal(epoch_batches(2)[0]["index"], epoch_batches(3)[0]["index"])
    assert not torch.equal(epoch_batches(2)[0]["index"], epoch_batches(2, seed=1)[0]["index"])


def test_resume_mid_epoch_yields_the_remaining_batches():
    dataset = in_memory(300)

    def make_loader():
        sampler = ContrastiveSampler(dataset.targets, num_negatives=8, mode="relax", seed=4)
        return build_train_loader(dataset, 32, "cpu", mean=MEAN, std=STD, seed=4,
                                  extra_fields={"contrastive_index": sampler})

    uninterrupted = make_loader()
    uninterrupted.set_epoch(7)
    reference = collect(uninterrupted)
    assert len(reference) == 10

    interrupted = make_loader()
    interrupted.set_epoch(7)
    collect(interrupted, limit=3)
    state = interrupted.state_dict()
    assert state["epoch"] == 7 and state["position"] == 3

    resumed = make_loader()
    resumed.load_state_dict(state)
    assert_same_batches(collect(resumed), reference[3:])
    assert resumed.position == 0                     # the epoch is finished
    with pytest.raises(UserError, match="mid-epoch"):
        build_train_loader(dataset, 16, "cpu", mean=MEAN, std=STD).load_state_dict(state)


def test_test_loader_shards_are_disjoint_and_complete():
    dataset = in_memory(101)
    seen = []
    for rank in range(2):
        loader = build_test_loader(dataset, 20, "cpu", mean=MEAN, std=STD, rank=rank,
                                   world_size=2)
        for batch in loader:
            torch.testing.assert_close(batch["image"], normalized(dataset.images[batch["index"]]),
                                       atol=1e-5, rtol=0)
            seen.append(batch["index"])
    seen = torch.cat(seen)
    assert torch.equal(seen, torch.arange(101))                # each sample exactly once
    single = build_test_loader(dataset, 20, "cpu", mean=MEAN, std=STD)
    assert_same_batches(collect(single), collect(single))


def test_extra_fields_are_added():
    loader = build_train_loader(in_memory(50), 16, "cpu", mean=MEAN, std=STD,
                                extra_fields={"twice": lambda index, target: index * 2,
                                              "label": lambda index, target: target})
    batch = next(iter(loader))
    assert torch.equal(batch["twice"], batch["index"] * 2)
    assert torch.equal(batch["label"], batch["target"])


class DictDataset(torch.utils.data.Dataset):
    """A plain torch Dataset of dict items (what the ImageNet folders return)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def test_torch_dataset_loader():
    dataset = in_memory(90)
    wrapped = DictDataset(dataset)
    loader = build_train_loader(wrapped, 16, "cpu", mean=MEAN, std=STD, num_workers=0,
                                extra_fields={"twice": lambda index, target: index * 2})
    loader.set_epoch(2)
    reference = collect(loader)
    assert len(loader) == len(reference) == 6
    indices = torch.cat([batch["index"] for batch in reference])
    assert torch.equal(indices.sort().values, torch.arange(90))
    first = reference[0]
    torch.testing.assert_close(first["image"], normalized(dataset.images[first["index"]]),
                               atol=1e-5, rtol=0)
    assert torch.equal(first["twice"], first["index"] * 2)
    interrupted = build_train_loader(wrapped, 16, "cpu", mean=MEAN, std=STD, num_workers=0)
    interrupted.set_epoch(2)
    collect(interrupted, limit=2)
    resumed = build_train_loader(wrapped, 16, "cpu", mean=MEAN, std=STD, num_workers=0)
    resumed.load_state_dict(interrupted.state_dict())
    assert torch.equal(torch.cat([batch["index"] for batch in collect(resumed)]), indices[32:])
    test = build_test_loader(wrapped, 16, "cpu", mean=MEAN, std=STD, rank=1, world_size=2,
                             num_workers=0)
    assert torch.equal(torch.cat([batch["index"] for batch in test]), torch.arange(45, 90))


def test_imagenet_folders(tmp_path):
    from PIL import Image
    with pytest.raises(UserError, match=str(tmp_path / "imagenet" / "train")):
        build_dataset("imagenet", str(tmp_path))
    for split in ("train", "val"):
        for name in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / name
            folder.mkdir(parents=True)
            for number in range(2):
                Image.new("RGB", (40, 30), (number * 100, 50, 200)).save(folder / f"{number}.png")
    data = build_dataset("imagenet", str(tmp_path))
    assert data.num_classes == 2 and data.image_size == 224
    assert data.train_targets.tolist() == [0, 0, 1, 1]
    loader = build_test_loader(data.test, 4, "cpu", mean=data.mean, std=data.std, num_workers=0)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 3, 224, 224)
    assert batch["target"].tolist() == [0, 0, 1, 1] and batch["index"].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------ contrastive
def unequal_targets():
    """Classes of 10, 20, 30 and 40 samples, interleaved."""
    grouped = torch.cat([torch.full((size,), label) for label, size in enumerate((10, 20, 30, 40))])
    return grouped[torch.randperm(100, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_contrastive_positives_and_negatives(mode):
    targets = unequal_targets()
    sampler = ContrastiveSampler(targets, num_negatives=50, mode=mode, seed=1)
    index = torch.arange(100)
    result = sampler(index, targets[index])
    assert tuple(result.shape) == (100, 51) and result.dtype == torch.long
    if mode == "exact":
        assert torch.equal(result[:, 0], index)
    else:
        assert torch.equal(targets[result[:, 0]], targets[index])
        assert not torch.equal(result[:, 0], index)
    assert bool((targets[result[:, 1:]] != targets[index].unsqueeze(1)).all())
    assert int(result.min()) >= 0 and int(result.max()) < 100


def test_contrastive_negatives_follow_class_sizes():
    targets = unequal_targets()
    sampler = ContrastiveSampler(targets, num_negatives=20000)
    members = (targets == 0).nonzero().flatten()[:4]
    negatives = sampler(members, targets[members])[:, 1:]
    share = torch.bincount(targets[negatives].flatten(), minlength=4).double() / negatives.numel()
    expected = torch.tensor([0, 20 / 90, 30 / 90, 40 / 90], dtype=torch.double)
    assert torch.allclose(share, expected, atol=0.01), share
    # Every sample of the other classes can be drawn.
    assert set(negatives.flatten().tolist()) == set((targets != 0).nonzero().flatten().tolist())


def test_contrastive_is_reproducible_and_validated():
    targets = unequal_targets()
    index = torch.arange(10)
    sampler = ContrastiveSampler(targets, num_negatives=16, mode="relax", seed=2)
    sampler.set_epoch(3)
    first = sampler(index)
    state = sampler.state_dict()
    second = sampler(index)
    assert not torch.equal(first, second)
    sampler.load_state_dict(state)
    assert torch.equal(sampler(index), second)
    sampler.set_epoch(3)
    assert torch.equal(sampler(index), first)
    with pytest.raises(UserError) as error:
        ContrastiveSampler(targets, 16, mode="loose")
    assert "exact" in str(error.value) and "relax" in str(error.value)
    with pytest.raises(UserError, match="two classes"):
        ContrastiveSampler(torch.zeros(5, dtype=torch.long), 4)


def test_digits_are_never_flipped_but_still_cropped():
    """Mirrored digits are other (or no) digits: the digits loader only shifts."""
    from mdistill.data import build_dataset, build_train_loader
    data = build_dataset("digits", None, False)
    assert data.hflip is False
    # One image whose columns are all different, repeated: any output is a pure shift.
    image = torch.arange(32, dtype=torch.uint8).repeat(3, 32, 1).unsqueeze(0) * 7
    dataset = ImageTensorDataset(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long))
    loader = build_train_loader(dataset, 64, "cpu", hflip=False, mean=(0, 0, 0), std=(1, 1, 1),
                                seed=3)
    loader.set_epoch(1)
    rows = next(iter(loader))["image"][:, 0, 16, 4:28] * 255       # away from the padding
    steps = rows[:, 1:] - rows[:, :-1]
    assert torch.allclose(steps, torch.full_like(steps, 7.0))     # increasing: never mirrored
