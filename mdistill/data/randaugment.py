"""RandAugment on the device, for whole batches of uint8 images (MLKD's strong view).

MLKD (Jin et al. 2023) trains on two views of each image: the usual weak one
(random crop with 4-pixel padding, horizontal flip) and a strong one. In the
authors' code the strong view is an independent crop and flip, then their
``RandAugment(2, 10)`` (FixMatch's variant: ``n = 2`` ops drawn uniformly,
with replacement, from the 14 of :data:`OPS`, each at a magnitude drawn
uniformly from its range; the ``10`` is unused), then a Cutout of a square of
side ``u * 0.5 * width`` filled with grey (125, 123, 114).

Here the ops follow PIL's definitions (``ImageOps`` / ``ImageEnhance`` and
``Image.transform`` with nearest sampling), written as tensor operations that
treat a whole batch at once, every sample with its own op and magnitude:

* geometric ops (identity, rotate, shear, translate) are one affine map per
  sample, applied with one ``gather``: an output pixel centre ``(x + .5, y + .5)``
  maps to input coordinates whose floor is the source pixel; outside is black;
* tone ops (autocontrast, equalize, posterize, solarize) are a 256-entry
  lookup table per sample and channel, applied with one ``gather``;
* enhance ops (brightness, color, contrast, sharpness) blend the image with a
  degenerate version of itself, ``floor(d + v * (x - d))`` clipped to 0..255
  (black, its greyscale, its mean grey, its 3x3 smoothing).

Each of the ``n`` steps computes the three kinds for the batch and keeps the
one each sample drew, so no step waits on the host. What each sample gets is
drawn once per epoch on the CPU (:meth:`RandAugmentView.plan`, from the
loader's seeded generator), so a run, and a resumed run, sees the same views.

Every op gives the same pixels as Pillow's (tests/test_randaugment.py compares
them on hand-made and random images), including PIL's 16.16 fixed-point
arithmetic for rotations and shears and its rounding in the 3x3 smoothing.
"""
import torch
import torch.nn.functional as F

#: The ops of the authors' ``augment_list``, in its order, with their magnitude ranges.
OPS = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
OP_INDEX = {name: index for index, (name, _, _) in enumerate(OPS)}
GEOMETRIC = ("Identity", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
TONE = ("AutoContrast", "Equalize", "Posterize", "Solarize")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")
#: Cutout's fill colour in the authors' code.
CUTOUT_FILL = (125, 123, 114)


def magnitudes(ops, levels):
    """Each op's magnitude from a uniform ``level`` in [0, 1): ``low + (high - low) * level``."""
    low = torch.tensor([op[1] for op in OPS], dtype=torch.float64, device=ops.device)
    high = torch.tensor([op[2] for op in OPS], dtype=torch.float64, device=ops.device)
    return low[ops] + (high - low)[ops] * levels.double()


def _is(ops, *names):
    """Which samples drew one of the ops ``names`` (bool, shaped like ``ops``)."""
    mask = torch.zeros_like(ops, dtype=torch.bool)
    for name in names:
        mask |= ops == OP_INDEX[name]
    return mask


def _pick(ops, *names):
    """:func:`_is` shaped ``[B, 1, 1, 1]`` to select whole images."""
    return _is(ops, *names)[:, None, None, None]


# ------------------------------------------------------------------ geometric
def affine_matrices(ops, values, height, width):
    """``[B, 2, 3]`` maps from output pixel coordinates to input coordinates (PIL's
    ``Image.transform(AFFINE)`` data; rotate as ``Image.rotate`` about the centre)."""
    angle = -torch.deg2rad(values)
    # PIL rounds the rotation matrix to 15 decimals (so 90 degrees is exact).
    cos = torch.round(torch.cos(angle) * 1e15) / 1e15
    sin = torch.round(torch.sin(angle) * 1e15) / 1e15
    cx, cy = width / 2.0, height / 2.0
    rotate, zero, one = _is(ops, "Rotate"), torch.zeros_like(values), torch.ones_like(values)
    a = torch.where(rotate, cos, one)
    b = torch.where(rotate, sin, torch.where(_is(ops, "ShearX"), values, zero))
    c = torch.where(rotate, cx - cos * cx - sin * cy,
                    torch.where(_is(ops, "TranslateX"), values * width, zero))
    d = torch.where(rotate, -sin, torch.where(_is(ops, "ShearY"), values, zero))
    e = torch.where(rotate, cos, one)
    f = torch.where(rotate, cy + sin * cx - cos * cy,
                    torch.where(_is(ops, "TranslateY"), values * height, zero))
    return torch.stack([a, b, c, d, e, f], dim=1).view(-1, 2, 3)


def _fixed(value):
    """PIL's 16.16 fixed point: ``floor(v * 65536 + 0.5)``."""
    return torch.floor(value * 65536.0 + 0.5).long()


def warp_nearest(images, matrices):
    """Nearest-neighbour affine warp of uint8 ``[B, C, H, W]``; outside pixels are 0.

    The source of output pixel ``(x, y)`` is the floor of the map applied to its
    centre ``(x + .5, y + .5)``. As PIL, maps that mix the axes (rotations,
    shears) are evaluated in 16.16 fixed point, pure shifts and scales in floats.
    """
    count, channels, height, width = images.shape
    xs = torch.arange(width, dtype=torch.float64, device=images.device)
    ys = torch.arange(height, dtype=torch.float64, device=images.device)[:, None]
    m = matrices.to(images.device)[:, :, :, None, None]
    # Where the centre of output pixel (0, 0) lands; each step in x or y adds a column of m.
    origin_x = m[:, 0, 2] + 0.5 * (m[:, 0, 0] + m[:, 0, 1])
    origin_y = m[:, 1, 2] + 0.5 * (m[:, 1, 0] + m[:, 1, 1])
    float_cols = torch.floor(origin_x + m[:, 0, 0] * xs + m[:, 0, 1] * ys).long()  # [B, H, W]
    float_rows = torch.floor(origin_y + m[:, 1, 0] * xs + m[:, 1, 1] * ys).long()
    fixed_cols = (_fixed(origin_x) + _fixed(m[:, 0, 0]) * xs.long()
                  + _fixed(m[:, 0, 1]) * ys.long()) >> 16
    fixed_rows = (_fixed(origin_y) + _fixed(m[:, 1, 0]) * xs.long()
                  + _fixed(m[:, 1, 1]) * ys.long()) >> 16
    mixed = (m[:, 0, 1] != 0) | (m[:, 1, 0] != 0)
    cols = torch.where(mixed, fixed_cols, float_cols)
    rows = torch.where(mixed, fixed_rows, float_rows)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    flat = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).view(count, 1, -1)
    pixels = images.reshape(count, channels, -1).gather(2, flat.expand(-1, channels, -1))
    return pixels.view(count, channels, height, width) * inside[:, None]


# ----------------------------------------------------------------------- tone
def autocontrast_tables(images):
    """``[B, C, 256]`` tables stretching each channel's min..max to 0..255 (PIL
    ``ImageOps.autocontrast``: ``int(i * scale + offset)``, identity for a flat channel)."""
    low = images.amin(dim=(2, 3)).double()[..., None]
    high = images.amax(dim=(2, 3)).double()[..., None]
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    # A true division: ``255.0 / tensor`` would multiply by a reciprocal and miss
    # PIL's rounding by one grey level now and then.
    scale = torch.full_like(high, 255.0).div((high - low).clamp(min=1))
    table = torch.trunc(levels * scale - low * scale).clamp(0, 255)
    return torch.where(high > low, table, levels).long()


def equalize_tables(images):
    """``[B, C, 256]`` histogram-equalisation tables, as PIL's ``ImageOps.equalize``:
    ``step = (N - count of the top level) // 255``, level ``i`` maps to
    ``(step // 2 + count below i) // step``; identity when ``step`` is 0."""
    count, channels = images.shape[:2]
    flat = images.reshape(count * channels, -1).long()
    histogram = torch.zeros(count * channels, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=images.device)
    top = torch.where(histogram > 0, levels, -1).amax(dim=1, keepdim=True)
    step = (flat.shape[1] - histogram.gather(1, top)) // 255
    below = histogram.cumsum(dim=1) - histogram
    table = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    table = torch.where(step > 0, table, levels)
    return table.view(count, channels, 256)


def tone_tables(ops, values, images):
    """The ``[B, C, 256]`` lookup table of each sample's tone op (identity for others)."""
    levels = torch.arange(256, device=images.device)
    bits = torch.floor(values).long().clamp(min=1)[:, None]
    posterize = (levels >> (8 - bits)) << (8 - bits)
    solarize = torch.where(levels < values[:, None], levels, 255 - levels)
    per_sample = torch.where(_is(ops, "Posterize")[:, None], posterize,
                             torch.where(_is(ops, "Solarize")[:, None], solarize, levels))
    table = per_sample[:, None].expand(-1, images.shape[1], -1)
    table = torch.where(_is(ops, "Equalize")[:, None, None], equalize_tables(images), table)
    return torch.where(_is(ops, "AutoContrast")[:, None, None], autocontrast_tables(images), table)


def apply_tables(images, tables):
    count, channels, height, width = images.shape
    flat = images.reshape(count, channels, -1).long()
    return tables.gather(2, flat).view(count, channels, height, width).to(torch.uint8)


# -------------------------------------------------------------------- enhance
def greyscale(images):
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``, ``[B, 1, H, W]``."""
    rgb = images.long()
    return (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 32768) >> 16


def smooth(images):
    """PIL's ``ImageFilter.SMOOTH``: the 3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13,
    rounded; the border pixels keep their values. Float ``[B, C, H, W]``."""
    channels = images.shape[1]
    kernel = torch.ones(3, 3, dtype=torch.float32, device=images.device)
    kernel[1, 1] = 5.0
    # Integer sums (exact in fp32), then an exact integer division by 13.
    sums = F.conv2d(images.float(), kernel.expand(channels, 1, 3, 3), groups=channels)
    inner = torch.floor(sums / 13.0 + 0.5).clamp(0, 255)
    out = images.float().clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def enhance(ops, values, images):
    """``floor(d + v * (x - d))`` with each sample's degenerate image ``d`` (PIL ``ImageEnhance``)."""
    pixels = images.float()
    grey = greyscale(images).float()
    mean = torch.floor(grey.double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).float()
    degenerate = torch.where(_pick(ops, "Sharpness"), smooth(images),
                             torch.where(_pick(ops, "Color"), grey.expand_as(pixels),
                                         torch.where(_pick(ops, "Contrast"), mean.expand_as(pixels),
                                                     torch.zeros_like(pixels))))
    factor = values.float()[:, None, None, None]
    return torch.floor(degenerate + factor * (pixels - degenerate)).clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------- the pipeline
def rand_augment(images, ops, levels):
    """Apply each sample's ops in turn.

    Args:
        images: uint8 ``[B, C, H, W]`` (C = 3).
        ops: long ``[B, n]``, indices into :data:`OPS`.
        levels: ``[B, n]`` uniform draws in [0, 1), mapped to each op's range.

    Returns:
        uint8 ``[B, C, H, W]``.
    """
    height, width = images.shape[2:]
    for step in range(ops.shape[1]):
        op = ops[:, step]
        values = magnitudes(op, levels[:, step])
        warped = warp_nearest(images, affine_matrices(op, values, height, width))
        toned = apply_tables(images, tone_tables(op, values, images))
        enhanced = enhance(op, values, images)
        images = torch.where(_pick(op, *GEOMETRIC), warped,
                             torch.where(_pick(op, *TONE), toned, enhanced))
    return images


def cutout(images, draws, fill=CUTOUT_FILL):
    """The authors' Cutout after RandAugment, per sample.

    ``draws[:, 0]`` sets the side ``s = draws * 0.5 * W``; the corner is
    ``int(max(0, c - s / 2))`` for a centre ``c`` drawn as ``np.random.uniform(W)``,
    which is uniform on ``(1, W]`` (numpy reads the one argument as ``low``,
    with ``high = 1``); the filled rectangle runs from the corner to
    ``int(min(W, corner + s))`` inclusive, as PIL's ``ImageDraw.rectangle``.
    A side of 0 leaves the image alone.
    """
    count, channels, height, width = images.shape
    draws = draws.double()
    side = draws[:, 0] * 0.5 * width
    centre_x = width + (1.0 - width) * draws[:, 1]
    centre_y = height + (1.0 - height) * draws[:, 2]
    x0 = torch.trunc((centre_x - side / 2).clamp(min=0))
    y0 = torch.trunc((centre_y - side / 2).clamp(min=0))
    x1 = torch.trunc(torch.minimum(x0 + side, torch.full_like(x0, width)))
    y1 = torch.trunc(torch.minimum(y0 + side, torch.full_like(y0, height)))
    cols = torch.arange(width, device=images.device, dtype=torch.float64)
    rows = torch.arange(height, device=images.device, dtype=torch.float64)
    in_cols = (cols >= x0[:, None]) & (cols <= x1[:, None])                      # [B, W]
    in_rows = (rows >= y0[:, None]) & (rows <= y1[:, None])                      # [B, H]
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (side > 0)[:, None, None]
    colour = torch.tensor(fill, dtype=torch.uint8, device=images.device)[:channels]
    return torch.where(mask[:, None], colour[None, :, None, None], images)


class ImageView:
    """An extra batch field that is another augmented view of the batch's images.

    A distiller declares one in :meth:`~mdistill.distillers.Distiller.extra_batch_fields`;
    the in-memory loader recognises it, draws its random choices for the
    epoch with :meth:`plan` (from a generator seeded by seed, epoch and rank)
    and renders each batch's view on the device with :meth:`render`, then
    normalises it like the main image.
    """

    def plan(self, count, generator, crop_span, hflip=True):
        """The epoch's random choices: ``{name: CPU tensor with leading dim count}``."""
        raise NotImplementedError

    def render(self, images, plan, crop_and_flip):
        """The view of raw uint8 ``images`` given the batch's slice of the plan (on
        their device); ``crop_and_flip(images, offsets [2, B], flips [B])`` is the
        loader's own padded crop and flip."""
        raise NotImplementedError


class RandAugmentView(ImageView):
    """MLKD's strong view: its own crop and flip, ``num_ops`` RandAugment ops, Cutout.

    Args:
        num_ops: ops applied per image (2 in the authors' code).
    """

    def __init__(self, num_ops=2):
        self.num_ops = num_ops

    def plan(self, count, generator, crop_span, hflip=True):
        offsets = torch.randint(0, crop_span, (count, 2), generator=generator)
        flips = torch.randint(0, 2, (count,), generator=generator).bool() & hflip
        ops = torch.randint(0, len(OPS), (count, self.num_ops), generator=generator)
        levels = torch.rand(count, self.num_ops, generator=generator, dtype=torch.float64)
        cutout_draws = torch.rand(count, 3, generator=generator, dtype=torch.float64)
        return {"offsets": offsets, "flips": flips, "ops": ops, "levels": levels,
                "cutout": cutout_draws}

    def render(self, images, plan, crop_and_flip):
        images = crop_and_flip(images, plan["offsets"].t(), plan["flips"])
        images = rand_augment(images, plan["ops"], plan["levels"])
        return cutout(images, plan["cutout"])

    def __repr__(self):
        return f"RandAugmentView(num_ops={self.num_ops})"


__all__ = ["OPS", "ImageView", "RandAugmentView", "cutout", "rand_augment"]
