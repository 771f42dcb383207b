"""
DeiT's data augmentation, from scratch, on batched uint8 tensors (B, C, H, W) on any device.

Paper §6 and Table 8: without Mixup and CutMix DeiT-B falls from 81.8 to 75.8% top-1, without RandAugment
to 79.6, and without random erasing training diverges. The reference runs RandAugment image by image in
PIL on the CPU; here every op works on a whole batch on the device, and every image draws its own ops,
magnitudes, boxes and rectangles from a torch.Generator. Exact semantics: REFERENCE.md §3. The ops follow
PIL's ImageOps / ImageEnhance / Image.transform (what the reference uses); the tests compare them with PIL.

Each op is usable alone, on a uint8 batch:

    apply_op(images, "Rotate", level=0.9, sign=-1)   # level in [0, 1] (= magnitude / 10), scalar or (B,)

This file needs only torch: copy it into your project.
"""

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Ops. Each takes uint8 images (B, C, H, W) and a per-image argument (B,) float tensor, returns uint8.


def _col(v):
    return v.view(-1, 1, 1, 1)


def _to_uint8(x):
    """PIL stores blends and filters by truncation after clipping to 0..255."""
    return x.clamp(0, 255).floor().to(torch.uint8)


def _blend(degenerate, img, factor):
    # PIL Image.blend(degenerate, img, factor) = degenerate + factor * (img - degenerate), as ImageEnhance does
    return _to_uint8(degenerate + _col(factor) * (img.float() - degenerate))


def _grey(img):
    """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, in integers. (B, 1, H, W) int32."""
    if img.shape[1] == 1:
        return img.int()
    r, g, b = img.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def auto_contrast(img, _=None):
    # per image and channel: stretch min..max to 0..255 (ImageOps.autocontrast, cutoff 0); flat stays as is
    flat = img.flatten(2)
    lo, hi = flat.amin(2).float()[..., None, None], flat.amax(2).float()[..., None, None]
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = _to_uint8((img.float() - lo) * scale)
    return torch.where(hi > lo, out, img)


def equalize(img, _=None):
    """ImageOps.equalize per image and channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels of the largest value) // 255; identity when step is 0."""
    B, C, H, W = img.shape
    flat = img.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=img.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = flat.amax(1, keepdim=True)  # the largest value present; PIL drops its count
    step = (H * W - hist.gather(1, top)) // 255  # (B*C, 1)
    below = hist.cumsum(1) - hist  # pixels with a smaller value
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, flat).to(torch.uint8)
    return torch.where(step > 0, out, flat.to(torch.uint8)).view(B, C, H, W)


def invert(img, _=None):
    return 255 - img


def posterize(img, bits):
    # keep the top `bits` bits; 0 bits gives black (PIL >= 10 rejects 0, the reference then crashes)
    mask = (0xFF << (8 - bits.long())) & 0xFF  # bits 8 -> 0xFF, bits 0 -> 0x00
    return img & _col(mask).to(torch.uint8)


def solarize(img, threshold):
    return torch.where(img.float() >= _col(threshold), 255 - img, img)


def solarize_add(img, add, threshold=128):
    out = (img.int() + _col(add).int()).clamp(max=255).to(torch.uint8)
    return torch.where(img < threshold, out, img)


def color(img, factor):  # saturation: blend with the grey image
    return _blend(_grey(img).float(), img, factor)


def contrast(img, factor):  # blend with the mean grey level, rounded: int(mean + 0.5)
    mean = _grey(img).float().mean((1, 2, 3), keepdim=True)
    return _blend(torch.floor(mean + 0.5), img, factor)


def brightness(img, factor):  # blend with black
    return _blend(torch.zeros((), device=img.device), img, factor)


def sharpness(img, factor):
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); the border pixels of the
    smoothed image stay as they were, as in PIL."""
    C = img.shape[1]
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=img.device) / 13
    smooth = F.conv2d(img.float(), k.expand(C, 1, 3, 3), groups=C)
    smooth = torch.floor(smooth + 0.5).clamp(0, 255)
    degenerate = img.float().clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, img, factor)


def affine(img, matrix, fill):
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill), batched: output pixel centre
    (x + 0.5, y + 0.5) samples the input at (a x' + b y' + c, d x' + e y' + f); a sample outside the image
    takes the fill colour; inside, PIL's bicubic (the a = -1 cubic, edge pixels repeated), truncated to uint8.
    matrix: (B, 6) in pixels; fill: C values in 0..255."""
    B, C, H, W = img.shape
    dev = img.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(W, device=dev) + 0.5, indexing="ij")
    m = matrix.to(dev, torch.float64).view(B, 6, 1, 1)
    xin = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # (B, H, W)
    yin = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    x0, y0 = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
    dx, dy = (xin - 0.5 - x0).float(), (yin - 0.5 - y0).float()

    def cubic(v1, v2, v3, v4, d):  # PIL's BICUBIC macro
        return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (v2 - v1 - v3 + v4)))
    flat = img.float().view(B, C, H * W)
    rows = []
    for j in range(-1, 3):  # the 4x4 neighbourhood, clamped to the image
        yi = (y0 + j).clamp(0, H - 1).long()
        taps = []
        for i in range(-1, 3):
            xi = (x0 + i).clamp(0, W - 1).long()
            idx = (yi * W + xi).view(B, 1, H * W).expand(B, C, H * W)
            taps.append(flat.gather(2, idx).view(B, C, H, W))
        rows.append(cubic(*taps, dx[:, None]))
    out = _to_uint8(cubic(*rows, dy[:, None]))
    fill = torch.as_tensor(fill, device=dev, dtype=torch.uint8).view(1, -1, 1, 1).expand(B, C, 1, 1)
    return torch.where(inside[:, None], out, fill)


def _ones(x):
    return torch.ones_like(x), torch.zeros_like(x)


def rotate(img, degrees, fill=128):
    # PIL Image.rotate(degrees) about the centre, counter-clockwise, same size
    B, C, H, W = img.shape
    t = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = W / 2, H / 2
    matrix = torch.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], 1)
    return affine(img, matrix, fill)


def shear_x(img, s, fill=128):
    one, zero = _ones(s.double())
    return affine(img, torch.stack([one, s.double(), zero, zero, one, zero], 1), fill)


def shear_y(img, s, fill=128):
    one, zero = _ones(s.double())
    return affine(img, torch.stack([one, zero, zero, s.double(), one, zero], 1), fill)


def translate_x(img, pixels, fill=128):
    one, zero = _ones(pixels.double())
    return affine(img, torch.stack([one, zero, pixels.double(), zero, one, zero], 1), fill)


def translate_y(img, pixels, fill=128):
    one, zero = _ones(pixels.double())
    return affine(img, torch.stack([one, zero, zero, zero, one, pixels.double()], 1), fill)


# ---------------------------------------------------------------------------------------------------------
# RandAugment's 15 ops (timm's "increasing" set, as DeiT's rand-m9-mstd0.5-inc1) and level -> argument.
# level = magnitude / 10 in [0, 1]; sign = +-1 where the op's argument is randomly negated.

def _enhance(level, sign):
    return (1.0 + sign * 0.9 * level).clamp(min=0.1)


OP_ARGS = {  # name -> (op, argument from (level, sign, H, W)); REFERENCE.md §3's table
    "AutoContrast": (auto_contrast, lambda l, s, H, W: l),
    "Equalize": (equalize, lambda l, s, H, W: l),
    "Invert": (invert, lambda l, s, H, W: l),
    "Rotate": (rotate, lambda l, s, H, W: s * 30.0 * l),
    "PosterizeIncreasing": (posterize, lambda l, s, H, W: 4 - (4 * l).floor()),
    "SolarizeIncreasing": (solarize, lambda l, s, H, W: 256 - (256 * l).floor()),
    "SolarizeAdd": (solarize_add, lambda l, s, H, W: (110 * l).floor().clamp(max=128)),
    "ColorIncreasing": (color, lambda l, s, H, W: _enhance(l, s)),
    "ContrastIncreasing": (contrast, lambda l, s, H, W: _enhance(l, s)),
    "BrightnessIncreasing": (brightness, lambda l, s, H, W: _enhance(l, s)),
    "SharpnessIncreasing": (sharpness, lambda l, s, H, W: _enhance(l, s)),
    "ShearX": (shear_x, lambda l, s, H, W: s * 0.3 * l),
    "ShearY": (shear_y, lambda l, s, H, W: s * 0.3 * l),
    "TranslateXRel": (translate_x, lambda l, s, H, W: s * 0.45 * l * W),
    "TranslateYRel": (translate_y, lambda l, s, H, W: s * 0.45 * l * H),
}
OP_NAMES = list(OP_ARGS)
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def op_argument(name, level, sign, H, W):
    """The op's argument for level in [0, 1] and sign +-1 (scalars or (B,) tensors)."""
    level, sign = torch.as_tensor(level, dtype=torch.float64), torch.as_tensor(sign, dtype=torch.float64)
    return OP_ARGS[name][1](level, sign, H, W)


def apply_op(images, name, level, sign=1.0, fill=128):
    """Apply one RandAugment op to a uint8 batch; level (= magnitude / 10) and sign may be per image."""
    B, C, H, W = images.shape
    arg = op_argument(name, level, sign, H, W).to(images.device).expand(B).float()
    op = OP_ARGS[name][0]
    if name in GEOMETRIC:
        return op(images, arg, fill=fill)
    return op(images, arg)


def rand_augment(images, gen, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=128):
    """DeiT's RandAugment (rand-m9-mstd0.5-inc1): per image, num_ops ops drawn uniformly with replacement,
    each applied with probability prob, with magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10].
    The loop is over op slots and op kinds, never over images: each op runs once on the images that drew it."""
    B, C, H, W = images.shape
    for _ in range(num_ops):
        which = torch.randint(0, len(OP_NAMES), (B,), generator=gen)
        apply = torch.rand(B, generator=gen) < prob
        level = (magnitude + magnitude_std * torch.randn(B, generator=gen)).clamp(0, 10) / 10
        sign = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
        for k, name in enumerate(OP_NAMES):
            idx = ((which == k) & apply).nonzero()[:, 0]
            if len(idx):
                dev_idx = idx.to(images.device)
                images = images.index_copy(0, dev_idx, apply_op(images[dev_idx], name, level[idx], sign[idx], fill))
    return images
