"""The device-side RandAugment of MLKD's strong view (mdistill/data/randaugment.py).

Each op is checked on a hand-made image whose result can be worked out by
hand, and against Pillow (the library the authors' augmentation calls) on
random images; the view is checked for shapes, dtype and determinism, and
through the real loader for reproducible, resumable epochs.
"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from mdistill.data import ImageTensorDataset, build_train_loader
from mdistill.data.loaders import TorchLoader
from mdistill.data.randaugment import (OP_INDEX, OPS, RandAugmentView, affine_matrices, cutout,
                                       enhance, magnitudes, rand_augment, tone_tables,
                                       apply_tables, warp_nearest)
from mdistill.errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


pytestmark = pytest.mark.usefixtures("one_thread")


def ramp(size=8):
    """A 3-channel uint8 image whose pixels are all different: value = 3 * (row * size + col)."""
    values = torch.arange(size * size).view(1, 1, size, size) * 3
    return torch.cat([values, values + 1, values + 2], dim=1).to(torch.uint8)


def op(name, value, images):
    """Apply one op at an exact magnitude (not drawn from its range)."""
    ops = torch.full((len(images),), OP_INDEX[name])
    values = torch.full((len(images),), float(value), dtype=torch.float64)
    height, width = images.shape[2:]
    if name in ("Identity", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        return warp_nearest(images, affine_matrices(ops, values, height, width))
    if name in ("AutoContrast", "Equalize", "Posterize", "Solarize"):
        return apply_tables(images, tone_tables(ops, values, images))
    return enhance(ops, values, images)


# ------------------------------------------------------- ops on hand-made images

def test_geometric_ops_on_a_ramp():
    image = ramp()
    assert torch.equal(op("Identity", 0, image), image)
    # Rotate is counter-clockwise, about the centre: 90 degrees is torch.rot90 over (H, W).
    assert torch.equal(op("Rotate", 90, image), torch.rot90(image, 1, dims=(2, 3)))
    # TranslateX by a quarter of the width: column x shows column x + 2, the rest is black.
    shifted = op("TranslateX", 0.25, image)
    assert torch.equal(shifted[..., :6], image[..., 2:]) and not shifted[..., 6:].any()
    shifted = op("TranslateY", -0.25, image)
    assert torch.equal(shifted[:, :, 2:], image[:, :, :6]) and not shifted[:, :, :2].any()
    # ShearX by 0.5: row y samples column floor(x + 0.5 + 0.5 * (y + 0.5)).
    sheared = op("ShearX", 0.5, image)
    for row in range(8):
        for col in range(8):
            source = int(np.floor(col + 0.5 + 0.5 * (row + 0.5)))
            expected = image[0, :, row, source] if source < 8 else torch.zeros(3, dtype=torch.uint8)
            assert torch.equal(sheared[0, :, row, col], expected)


def test_tone_ops_on_hand_made_images():
    image = ramp()
    assert torch.equal(op("Posterize", 4, image), image & 0xF0)
    assert torch.equal(op("Solarize", 100, image),
                       torch.where(image < 100, image, 255 - image))
    # AutoContrast stretches each channel's own min..max to 0..255.
    narrow = (50 + ramp() // 4).to(torch.uint8)
    stretched = op("AutoContrast", 0, narrow)
    assert stretched.amin(dim=(2, 3)).eq(0).all() and stretched.amax(dim=(2, 3)).eq(255).all()
    # Equalize of a 32x32 two-level image, half at 10, half at 200: step (1024 - 512) // 255
    # = 2, so 10 -> (1 + 0) // 2 = 0 and 200 -> (1 + 512) // 2, clipped to 255.
    two = torch.full((1, 3, 32, 32), 10, dtype=torch.uint8)
    two[:, :, 16:] = 200
    equalized = op("Equalize", 0, two)
    assert equalized[:, :, :16].eq(0).all() and equalized[:, :, 16:].eq(255).all()
    # Too few pixels for a step (64 - 32 < 255): PIL leaves the image alone.
    assert torch.equal(op("Equalize", 0, two[:, :, 12:20, :8]), two[:, :, 12:20, :8])


def test_enhance_ops_on_hand_made_images():
    image = ramp()
    assert torch.equal(op("Brightness", 0.5, image), image // 2)
    # Color at 0 is PIL's greyscale L = (19595 R + 38470 G + 7471 B + 32768) >> 16 everywhere.
    rgb = image.long()
    grey = (19595 * rgb[:, 0] + 38470 * rgb[:, 1] + 7471 * rgb[:, 2] + 32768) >> 16
    assert torch.equal(op("Color", 0, image).long(), grey[:, None].expand(-1, 3, -1, -1))
    # Contrast at 0 is a flat image at the rounded mean grey level.
    flat = op("Contrast", 0, image)
    assert flat.unique().numel() == 1 and int(flat[0, 0, 0, 0]) == int(grey.double().mean() + 0.5)
    # Sharpness at 0 is the 3x3 smoothing: a lone bright pixel spreads 5/13 and 1/13.
    dot = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    dot[:, :, 4, 4] = 130
    smoothed = op("Sharpness", 0, dot)
    assert smoothed[0, 0, 4, 4] == 50 and smoothed[0, 0, 3, 3] == 10 and smoothed[0, 0, 4, 6] == 0
    # Sharpness at 1 and every blend at factor 1 give the image back.
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert torch.equal(op(name, 1.0, image), image), name


def test_cutout_fills_the_drawn_square_with_grey():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    # Side 0.5 * 0.5 * 32 = 8; centre from np.random.uniform(32) = 32 - 31 u: u = 16 / 31 -> 16.
    draws = torch.tensor([[0.5, 16 / 31, 16 / 31], [0.0, 0.5, 0.5]], dtype=torch.float64)
    out = cutout(images, draws)
    filled = (out[0] != 0).any(dim=0)
    rows, cols = filled.nonzero(as_tuple=True)
    # Corner int(16 - 4) = 12; PIL's rectangle is inclusive: 12 .. 20.
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 20, 12, 20)
    assert filled.sum() == 81 and out[0, :, 15, 15].tolist() == [125, 123, 114]
    assert not out[1].any()                  # a side of 0 leaves the image alone


# ------------------------------------------------------- against Pillow itself

def pil_op(image, name, value):
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Posterize":
        return ImageOps.posterize(image, max(1, int(value)))
    if name == "Solarize":
        return ImageOps.solarize(image, value)
    if name == "Rotate":
        return image.rotate(value)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(image).enhance(value)
    width, height = image.size
    data = {"Identity": (1, 0, 0, 0, 1, 0), "ShearX": (1, value, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, value, 1, 0), "TranslateX": (1, 0, value * width, 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, value * height)}[name]
    return image.transform(image.size, Image.AFFINE, data)


@pytest.mark.parametrize("name", [name for name, _, _ in OPS])
def test_every_op_gives_pillows_pixels(name):
    rng = np.random.default_rng(0)
    count = 6
    pixels = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    pixels[3:] = (np.cumsum(rng.integers(0, 12, size=(3, 32, 32, 3)), axis=2) % 256)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    ops = torch.full((count, 1), OP_INDEX[name])
    levels = torch.rand(count, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values = magnitudes(ops[:, 0], levels[:, 0])
    ours = rand_augment(images, ops, levels).permute(0, 2, 3, 1).numpy()
    for i in range(count):
        expected = np.asarray(pil_op(Image.fromarray(pixels[i]), name, float(values[i])))
        np.testing.assert_array_equal(ours[i], expected, err_msg=f"{name} at {float(values[i])}")


def test_cutout_matches_pils_rectangle():
    rng = np.random.default_rng(3)
    draws = torch.from_numpy(rng.random((5, 3)))
    ours = cutout(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), draws)
    for i, (size, u_x, u_y) in enumerate(draws.tolist()):
        image = Image.new("RGB", (32, 32))
        side = size * 0.5 * 32
        x0 = int(max(0, 32 + (1 - 32) * u_x - side / 2.0))
        y0 = int(max(0, 32 + (1 - 32) * u_y - side / 2.0))
        ImageDraw.Draw(image).rectangle((x0, y0, min(32, x0 + side), min(32, y0 + side)),
                                        (125, 123, 114))
        np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), np.asarray(image))


# ---------------------------------------------------------------- the view

def plan_and_render(view, images, seed):
    plan = view.plan(len(images), torch.Generator().manual_seed(seed), crop_span=9)
    identity = lambda images, offsets, flips: images      # noqa: E731  (no crop here)
    return plan, view.render(images, plan, identity)


def test_view_shapes_dtype_and_determinism():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    view = RandAugmentView(num_ops=2)
    plan, first = plan_and_render(view, images, seed=7)
    _, again = plan_and_render(view, images, seed=7)
    _, other = plan_and_render(view, images, seed=8)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert plan["ops"].shape == (16, 2) and plan["ops"].max() < len(OPS)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, images)


def dataset(count=40):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(count) % 10)


def loader(data, seed=0):
    return build_train_loader(data, 16, "cpu", mean=CIFAR_MEAN, std=CIFAR_STD, seed=seed,
                              extra_fields={"image_strong": RandAugmentView()})


def test_loader_delivers_a_reproducible_resumable_strong_view():
    data = dataset()
    first = loader(data)
    first.set_epoch(3)
    batches = [{k: v.clone() for k, v in batch.items()} for batch in first]
    assert all(batch["image_strong"].dtype == torch.float32 and
               batch["image_strong"].shape == batch["image"].shape for batch in batches)
    assert not torch.equal(batches[0]["image_strong"], batches[0]["image"])
    # The same seed and epoch give the same strong views; another epoch other ones.
    again = loader(data)
    again.set_epoch(3)
    assert all(torch.equal(a["image_strong"], b["image_strong"]) for a, b in zip(batches, again))
    again.set_epoch(4)
    assert not torch.equal(next(iter(again))["image_strong"], batches[0]["image_strong"])
    # Resuming after one batch replays the second batch exactly.
    resumed = loader(data)
    resumed.load_state_dict({"epoch": 3, "position": 1, "batch_size": 16, "world_size": 1,
                             "extra_fields": {}})
    assert torch.equal(next(iter(resumed))["image_strong"], batches[1]["image_strong"])


def test_folder_datasets_refuse_an_extra_view():
    with pytest.raises(UserError, match="in-memory dataset"):
        TorchLoader(dataset(), 16, "cpu", mean=CIFAR_MEAN, std=CIFAR_STD, num_workers=0,
                    extra_fields={"image_strong": RandAugmentView()})
