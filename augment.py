"""
DeiT's data augmentation, from scratch, on batched uint8 tensors (B, C, H, W) on any device.

Paper §6 and Table 8: without Mixup and CutMix DeiT-B falls from 81.8 to 75.8% top-1, without RandAugment to 79.6,
and without random erasing training diverges. The reference runs RandAugment image by image in PIL on the CPU; here
every op works on a whole batch on the device, every image drawing its own ops, magnitudes, boxes and rectangles.
Semantics: the reference's (timm's auto_augment.py, mixup.py, random_erasing.py, transforms.py as facebookresearch/deit
datasets.py and main.py set them up); the ops follow PIL's ImageOps, ImageEnhance and Image.transform, as the tests
check. This file needs only torch and numpy: copy it into your project. Each op is usable alone, on a uint8 batch:

    apply_op(images, "Rotate", level=0.9, sign=-1)   # level in [0, 1] (= magnitude / 10), scalar or (B,)
"""

import math
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# resized_crops' nested tensors warn "prototype stage" at every use: silenced once, here (it runs in a thread)
warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage", UserWarning)

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
    out = _to_uint8((img.float() - lo) * (255.0 / (hi - lo).clamp(min=1)))
    return torch.where(hi > lo, out, img)


def equalize(img, _=None):
    """ImageOps.equalize per image and channel, by PIL's integer lut; identity when step is 0."""
    B, C, H, W = img.shape
    flat = img.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=img.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = flat.amax(1, keepdim=True)  # the largest value present; PIL drops its count
    step = (H * W - hist.gather(1, top)) // 255  # (B*C, 1)
    below = hist.cumsum(1) - hist  # pixels with a smaller value
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut.gather(1, flat), flat).to(torch.uint8).view(B, C, H, W)


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
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border pixels kept, as PIL)."""
    x = img.float()
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # 3x3 box sum as shifted sums: cheaper than a conv
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (box + 4 * x[:, :, 1:-1, 1:-1]).div_(13).add_(0.5).floor_()  # (sum + 4 centre) / 13
    return _blend(degenerate, img, factor)


def affine(img, matrix, fill):
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill), batched: output pixel centre
    (x + 0.5, y + 0.5) samples the input at (a x' + b y' + c, d x' + e y' + f): the fill colour outside the image
    (PIL's rule), inside a bicubic with edge pixels repeated, truncated to uint8. matrix: (B, 6) in pixels; fill: C
    values in 0..255 (a uint8 tensor on the device costs no copy). Deliberately grid_sample's a = -0.75 cubic, not
    PIL's a = -1: one fused kernel, no 16-tap gather (test_ops_match_pil; README, "Differences from the reference")."""
    B, C, H, W = img.shape
    dev = img.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(W, device=dev) + 0.5, indexing="ij")
    m = matrix.to(dev, torch.float32).view(B, 6, 1, 1)
    xin = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # (B, H, W), in pixels
    yin = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    grid = torch.stack([xin * (2 / W) - 1, yin * (2 / H) - 1], -1)  # grid_sample's [-1, 1], align_corners=False
    out = F.grid_sample(img.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    out = out.add_(1e-3).clamp_(0, 255).floor_().to(torch.uint8)  # truncate as PIL; 1e-3 absorbs float error
    fill = torch.as_tensor(fill, device=dev, dtype=torch.uint8).view(1, -1, 1, 1).expand(B, C, 1, 1)
    return torch.where(inside[:, None], out, fill)


def _matrix(arg, **entries):
    """Per-image affine matrices (B, 6) (a..f), the identity but the named entries, built on arg's device."""
    m = torch.zeros(len(arg), 6, dtype=torch.float64, device=arg.device)
    m[:, 0] = m[:, 4] = 1.0
    for name, value in entries.items():
        m[:, "abcdef".index(name)] = value.double()
    return m


def rotate(img, degrees, fill=128):
    # PIL Image.rotate(degrees): counter-clockwise about the centre (W/2, H/2), same size
    t = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = img.shape[-1] / 2, img.shape[-2] / 2
    return affine(img, _matrix(degrees, a=cos, b=sin, c=cx - cos * cx - sin * cy,
                               d=-sin, e=cos, f=cy + sin * cx - cos * cy), fill)


def shear_x(img, s, fill=128):  # x_in = x + s y (timm's matrix (1, s, 0, 0, 1, 0))
    return affine(img, _matrix(s, b=s), fill)


def shear_y(img, s, fill=128):
    return affine(img, _matrix(s, d=s), fill)


def translate_x(img, pixels, fill=128):  # x_in = x + pixels: the content moves left for positive pixels
    return affine(img, _matrix(pixels, c=pixels), fill)


def translate_y(img, pixels, fill=128):
    return affine(img, _matrix(pixels, f=pixels), fill)


# ---------------------------------------------------------------------------------------------------------
# The host decides, the device computes: every random choice (op, applied or not, magnitude, box, flip, lam) is drawn
# on the host from a numpy Generator, so per-op subset sizes are known without asking the device, and the CPU never
# waits for the GPU to read a value back (.item(), nonzero(), a boolean mask). Only per-pixel noise is drawn there.

def to_device(device, *arrays):
    """Small host arrays -> float32 tensors on device, through one buffer and one copy that does not wait:
    pinned memory on CUDA, since a copy from ordinary (pageable) memory makes the CPU wait for the GPU."""
    flat = [np.asarray(a, np.float32).ravel() for a in arrays]
    buf = torch.from_numpy(np.concatenate(flat))
    buf = buf.pin_memory() if device.type == "cuda" else buf
    parts = buf.to(device, non_blocking=True).split([len(f) for f in flat])
    return [p.view(np.shape(a)) for p, a in zip(parts, arrays)]


# ---------------------------------------------------------------------------------------------------------
# RandAugment's 15 ops (timm's "increasing" set, as DeiT's rand-m9-mstd0.5-inc1) and level -> argument, with
# sign = +-1 where timm negates it at random; computed on the host in float64, as timm does in Python.

def _enhance(level, sign):
    return np.maximum(1.0 + sign * 0.9 * level, 0.1)


OP_ARGS = {  # name -> (op, argument from (level, sign, H, W)), as timm's auto_augment.py LEVEL_TO_ARG
    "AutoContrast": (auto_contrast, lambda l, s, H, W: l),
    "Equalize": (equalize, lambda l, s, H, W: l),
    "Invert": (invert, lambda l, s, H, W: l),
    "Rotate": (rotate, lambda l, s, H, W: s * 30.0 * l),
    "PosterizeIncreasing": (posterize, lambda l, s, H, W: 4 - np.floor(4 * l)),
    "SolarizeIncreasing": (solarize, lambda l, s, H, W: 256 - np.floor(256 * l)),
    "SolarizeAdd": (solarize_add, lambda l, s, H, W: np.minimum(np.floor(110 * l), 128)),
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
    """The op's argument for level in [0, 1] and sign +-1 (scalars or (B,) arrays), on the host."""
    return OP_ARGS[name][1](np.asarray(level, np.float64), np.asarray(sign, np.float64), H, W)


def _run_op(images, name, arg, fill):
    op = OP_ARGS[name][0]
    return op(images, arg, fill=fill) if name in GEOMETRIC else op(images, arg)


def apply_op(images, name, level, sign=1.0, fill=128):
    """Apply one RandAugment op to a uint8 batch; level (= magnitude / 10) and sign may be per image."""
    B, C, H, W = images.shape
    arg = np.broadcast_to(op_argument(name, level, sign, H, W), (B,))
    arg, fill = to_device(images.device, arg, np.broadcast_to(fill, (C,)))
    return _run_op(images, name, arg, fill.to(torch.uint8))


def rand_augment(images, rng, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=128):
    """DeiT's RandAugment: per image num_ops ops drawn uniformly with replacement, each applied with probability prob
    at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]; each op runs once, on the images that drew it."""
    B, C, H, W = images.shape
    plan = []  # (op name, indices of the images that drew it, their arguments), in the order they apply
    for _ in range(num_ops):
        which = rng.integers(0, len(OP_NAMES), B)
        apply = rng.random(B) < prob
        level = np.clip(magnitude + magnitude_std * rng.standard_normal(B), 0, 10) / 10
        sign = np.where(rng.random(B) < 0.5, -1.0, 1.0)
        for k, name in enumerate(OP_NAMES):
            idx = np.flatnonzero((which == k) & apply)
            if len(idx):
                plan.append((name, idx, op_argument(name, level[idx], sign[idx], H, W)))
    fill, *tensors = to_device(images.device, np.broadcast_to(fill, (C,)), *[a for _, i, g in plan for a in (i, g)])
    fill = fill.to(torch.uint8)
    images = images.clone()  # written in place below, one op kind at a time
    for (name, _, _), idx, arg in zip(plan, tensors[0::2], tensors[1::2]):
        idx = idx.long()
        images.index_copy_(0, idx, _run_op(images.index_select(0, idx), name, arg, fill))
    return images


# ---------------------------------------------------------------------------------------------------------
# Crops and flips (uint8, before RandAugment), as the reference's transforms, drawn per image.

def _box_sizes(rng, B, H, W, area, ratio, attempts, fits):
    """Up to `attempts` tries per image of a box of area ~ U(area) * H * W and aspect w/h log-uniform in
    ratio, rounded to pixels; the first try that fits(h, w) wins. Returns h, w (B,) and whether one fit."""
    a = H * W * rng.uniform(area[0], area[1], (B, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (B, attempts)))
    w, h = np.round(np.sqrt(a * aspect)), np.round(np.sqrt(a / aspect))
    ok = fits(h, w)
    first = ok.argmax(1)[:, None]  # the first attempt that fits
    return np.take_along_axis(h, first, 1)[:, 0], np.take_along_axis(w, first, 1)[:, 0], ok.any(1)


def sample_boxes(rng, B, H, W, scale, ratio, attempts=10):
    """RandomResizedCrop's box per image (torchvision/timm): _box_sizes's, or if none fits, the whole image
    centre-cropped to the nearest allowed aspect ratio. Returns top, left, height, width as (B,) float arrays."""
    h, w, found = _box_sizes(rng, B, H, W, scale, ratio, attempts, lambda h, w: (w > 0) & (h > 0) & (w <= W) & (h <= H))
    r = W / H
    fw, fh = (W, round(W / ratio[0])) if r < ratio[0] else (round(H * ratio[1]), H) if r > ratio[1] else (W, H)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, np.floor(rng.random(B) * (H - h + 1)), np.floor((H - h) / 2))
    left = np.where(found, np.floor(rng.random(B) * (W - w + 1)), np.floor((W - w) / 2))
    return top, left, h, w


def random_resized_crop(images, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5):
    """RandomResizedCrop(size, scale, ratio, bicubic) + flip (p hflip), a box per image, with grid_sample's a = -0.75
    bicubic, not PIL's a = -0.5, unantialiased: these images are small, mostly upsampled (files: resized_crops)."""
    B, C, H, W = images.shape
    top, left, h, w, flip = to_device(images.device, *sample_boxes(rng, B, H, W, scale, ratio), rng.random(B) < hflip)
    # output pixel centre u in (0, 1) maps to x = left + u * w in pixels, then to grid_sample's [-1, 1]
    u = (torch.arange(size, device=images.device) + 0.5) / size
    gx = (left[:, None] + u * w[:, None]) * 2 / W - 1  # (B, size)
    gx = torch.where(flip[:, None] > 0, gx.flip(1), gx)
    gy = (top[:, None] + u * h[:, None]) * 2 / H - 1
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _pil_cubic(x, a=-0.5):  # PIL's bicubic kernel (Resample.c)
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))


def _resample_matrices(lo, hi, n_in, out, n_max):
    """(B, out, n_max) float64: PIL's weights for resampling [lo, hi) of an axis of n_in pixels to out pixels,
    zero past n_in (Resample.c precompute_coeffs): output pixel i samples centre lo + (i + 0.5) * scale; when
    shrinking (scale > 1) the kernel is widened by scale, which is PIL's antialiasing; each row sums to 1."""
    lo, hi, n_in = lo.double()[:, None], hi.double()[:, None], n_in.double()[:, None]
    scale = (hi - lo) / out
    widen = scale.clamp(min=1)
    centre = lo + (torch.arange(out, device=lo.device, dtype=torch.float64) + 0.5) * scale  # (B, out)
    first = (centre - 2 * widen + 0.5).trunc().clamp(min=0)[..., None]  # C's (int) cast, as PIL
    last = torch.minimum((centre + 2 * widen + 0.5).trunc(), n_in)[..., None]
    j = torch.arange(n_max, device=lo.device, dtype=torch.float64)
    w = _pil_cubic((j - centre[..., None] + 0.5) / widen[..., None]) * ((j >= first) & (j < last))
    return w / w.sum(-1, keepdim=True)


def tf32(t):
    """float32 t rounded to TF32's 10-bit mantissa (to nearest), what a CUDA matmul in TF32 reads of it."""
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def exact_matmul(a, b, a_exact=False, b_exact=False):
    """a @ b in float32 precision, also where CUDA matmuls run in TF32 (train.py allows it for the model, globally):
    each operand split into its TF32 part and the rest, the three products that matter summed ("3xTF32"; the rest's own
    rounding is 2^-11 of 2^-11); an operand TF32 holds exactly (a_exact, b_exact: pixels) is not split: two products.
    One TF32 product moves 6.7% of the crops' pixels, by up to 2 levels (test_crops_and_blur_stay_exact_under_tf32)."""
    if not torch.backends.cuda.matmul.allow_tf32:
        return a @ b
    if a_exact:
        b_hi = tf32(b)
        return a @ b_hi + a @ (b - b_hi)
    if b_exact:
        a_hi = tf32(a)
        return a_hi @ b + (a - a_hi) @ b
    a_hi, b_hi = tf32(a), tf32(b)
    return a_hi @ b_hi + (a_hi @ (b - b_hi) + (a - a_hi) @ b_hi)


def resized_crops(images, boxes, sizes, size, budget=2 ** 26):
    """Decoded files of different sizes -> (B, C, size, size) uint8: each image's box (x0, y0, x1, y1 in its pixels,
    floats) resized as PIL's img.resize((size, size), BICUBIC, box=box) does, for a whole batch at once. An
    antialiased resize is linear, separable and a function of the box alone: out = Wy @ X @ Wx^T, with the crop in
    the matrices. So the images are zero-padded to a common size (nested tensors: no Python loop) and resized by two
    batched matmuls; like PIL, the first (horizontal) pass is rounded to uint8. sizes: (B, 2) host (H, W). Groups by
    area of at most budget padded pixels: one huge photo does not pad the whole batch."""
    dev, B = images[0].device, len(images)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(B, 2)
    order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
    sizes = sizes[order]
    groups, start = [], 0
    for i in range(1, B + 1):  # a loop over groups of the sorted sizes: host integers only
        if i == B or (i + 1 - start) * sizes[start:i + 1].max(0).prod() > budget:
            groups.append((start, i))
            start = i
    boxes_d, sizes_d, inverse = to_device(dev, np.asarray(boxes)[order], sizes, np.argsort(order))
    outs = []
    for a, b in groups:
        Hm, Wm = (int(v) for v in sizes[a:b].max(0))
        x = torch.nested.as_nested_tensor([images[i] for i in order[a:b]])
        x = torch.nested.to_padded_tensor(x, 0, output_size=(b - a, images[0].shape[0], Hm, Wm)).float()
        bx, sz = boxes_d[a:b], sizes_d[a:b]
        wx = _resample_matrices(bx[:, 0], bx[:, 2], sz[:, 1], size, Wm).float()  # (b, size, Wm)
        wy = _resample_matrices(bx[:, 1], bx[:, 3], sz[:, 0], size, Hm).float()  # (b, size, Hm)
        t = exact_matmul(x, wx.transpose(1, 2)[:, None], a_exact=True).add_(0.5).floor_().clamp_(0, 255)  # (b, C, Hm, size)
        outs.append(exact_matmul(wy[:, None], t, b_exact=True).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(outs)[inverse.long()]


def pad_crop_flip(images, rng, pad=4, hflip=0.5):
    """RandomCrop(size, padding=pad) + hflip, DeiT's crop at 32 px or less: zero padding, per-image offset and flip."""
    B, C, H, W = images.shape
    dev = images.device
    top, left, flip = to_device(dev, rng.integers(0, 2 * pad + 1, B), rng.integers(0, 2 * pad + 1, B),
                                rng.random(B) < hflip)
    xp = F.pad(images, (pad, pad, pad, pad))
    rows = (top.long()[:, None] + torch.arange(H, device=dev))[:, :, None]  # (B, H, 1)
    cols = left.long()[:, None] + torch.arange(W, device=dev)
    cols = torch.where(flip[:, None] > 0, cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(B, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B,H,W,C) -> (B,C,H,W)
    # in the usual layout: a channels-last batch makes the patch embedding's weight gradient channels-last, which
    # DDP's buckets must copy, warning on every process (one channel: only an explicit clone changes the strides)
    return out.clone(memory_format=torch.contiguous_format)


def three_augment(images, rng, jitter=0.3):
    """DeiT III's 3-Augment (Touvron et al. 2022, §2.3): per image one of grayscale, solarize (threshold 128), gaussian
    blur (sigma U(0.1, 2)), then colour jitter (brightness, contrast, saturation ~ U(1 -+ jitter)). Deliberately
    simpler: a fixed jitter order (torchvision shuffles it per image), the blur cut at radius 4 (PIL: box blurs)."""
    B, C, H, W = images.shape
    which = rng.integers(0, 3, B)
    idx = [np.flatnonzero(which == k) for k in range(3)]
    sigma = rng.uniform(0.1, 2.0, B)
    factors = rng.uniform(1 - jitter, 1 + jitter, (3, B))  # brightness, contrast, saturation
    factors, *parts = to_device(images.device, factors, *[a for i in idx for a in (i, sigma[i])])
    ops = (lambda x, s: _grey(x).expand(x.shape).to(torch.uint8),
           lambda x, s: solarize(x, torch.full_like(s, 128.0)), _gaussian_blur)
    out = images.clone()
    for op, k, i, s in zip(ops, range(3), parts[0::2], parts[1::2]):  # each op only on the images that drew it
        if len(idx[k]):
            i = i.long()
            out.index_copy_(0, i, op(images.index_select(0, i), s))
    for op, f in zip((brightness, contrast, color), factors):
        out = op(out, f)
    return out


def _gaussian_blur(images, sigma):
    # separable gaussian, per-image sigma, kernel radius 4 (covers 2 sigma at the largest sigma 2)
    r = torch.arange(-4, 5, device=images.device, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 9)
    x = F.pad(images.float(), (4, 4, 4, 4), mode="replicate")
    k = k[:, None, None, None, :]  # along W, then along H: weighted sums of 9 neighbours, elementwise (no TF32)
    x = (x.unfold(3, 9, 1) * k).sum(-1)
    x = (x.unfold(2, 9, 1) * k).sum(-1)
    return x.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# After normalisation (float): random erasing, then Mixup / CutMix on the batch with soft targets.

def normalize(x, mean, std):
    """uint8 (B, C, H, W) -> (x / 255 - mean) / std as float, in one pass after the cast."""
    mean, std = (t.view(1, -1, 1, 1) for t in to_device(x.device, mean, std))
    return torch.addcmul(-mean / std, x.float(), 1 / (255 * std))


def random_erasing(x, rng, p=0.25, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts=10, gen=None):
    """Random erasing (Zhong et al. 2017) as DeiT: per image with probability p, one rectangle (_box_sizes) of
    N(0, 1) values (mode "pixel") from gen, a torch.Generator on x's device, in the normalised x, in place (as timm)."""
    B, C, H, W = x.shape
    # timm draws the aspect as h/w; the range is symmetric (0.3 .. 1/0.3), so w/h has the same law
    h, w, fits = _box_sizes(rng, B, H, W, area, ratio, attempts, lambda h, w: (h < H) & (w < W))
    top, left = np.floor(rng.random(B) * (H - h + 1)), np.floor(rng.random(B) * (W - w + 1))
    idx = np.flatnonzero(fits & (rng.random(B) < p))  # the images erased
    if not len(idx):
        return x
    idx, top, left, h, w = to_device(x.device, idx, top[idx], left[idx], h[idx], w[idx])
    ys, xs = torch.arange(H, device=x.device)[:, None], torch.arange(W, device=x.device)
    inside = ((ys >= top[:, None, None]) & (ys < (top + h)[:, None, None])
              & (xs >= left[:, None, None]) & (xs < (left + w)[:, None, None]))[:, None]  # (n, 1, H, W)
    idx = idx.long()
    noise = torch.randn((len(idx), C, H, W), generator=gen, device=x.device, dtype=x.dtype)
    return x.index_copy_(0, idx, torch.where(inside, noise, x.index_select(0, idx)))


def mixup_cutmix(x, y, num_classes, rng, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), one per batch, as DeiT: image i's partner is B-1-i (any
    batch size); CutMix (probability switch_prob) pastes a box of area 1 - lam, clipped, lam recomputed from it. Returns
    (x, mixed in place as timm; targets (B, classes): the pair's label-smoothed one-hots weighted lam and 1 - lam)."""
    B, C, H, W = x.shape
    lam = 1.0
    if cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob):
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.random() * H), int(rng.random() * W)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x[:, :, y1:y2, x1:x2] = x[:, :, y1:y2, x1:x2].flip(0)  # flip() copies the box first
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
    elif mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        partner = x.flip(0)  # a copy, taken before x changes
        x = x.mul_(lam).add_(partner, alpha=1 - lam)
    off = smoothing / num_classes  # label smoothing
    t = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)
    return x, lam * t + (1 - lam) * t.flip(0)


# ---------------------------------------------------------------------------------------------------------
# DeiT's recipe, as facebookresearch/deit datasets.py (build_transform) and main.py (Mixup) compose it: deit_augment.

def parse_aa(spec):
    """timm's RandAugment string, DeiT's --aa, e.g. rand-m9-mstd0.5-inc1 (DeiT's): magnitude 9, its std 0.5,
    the 'increasing' op set; -nN sets the number of ops (2). Returns rand_augment's keyword arguments."""
    if spec.split("-")[0] != "rand":
        raise ValueError(f"--aa {spec!r}: expected 'none' or a RandAugment string like rand-m9-mstd0.5-inc1")
    kw = dict(num_ops=2, magnitude=9.0, magnitude_std=0.0)
    names = {"m": "magnitude", "mstd": "magnitude_std", "n": "num_ops"}
    for p in spec.split("-")[1:]:
        m = re.fullmatch(r"(mstd|m|n|inc)(\d+(?:\.\d*)?)", p)  # key, number
        if not m or (m[1] == "inc" and float(m[2]) != 1):
            raise ValueError(f"--aa {spec!r}: cannot read {p!r} (known: mN, mstdX, nN, inc1)")
        if m[1] != "inc":
            kw[names[m[1]]] = int(float(m[2])) if m[1] == "n" else float(m[2])
    return kw


def deit_augment(x, y, rng, gen=None, *, num_classes, mean, std, cropped=False, crop_pad=4, rrc_scale=None,
                 hflip=0.5, aa="rand-m9-mstd0.5-inc1", three_aug=False, reprob=0.25, mixup=0.8, cutmix=1.0,
                 switch_prob=0.5, smoothing=0.1):
    """DeiT's training augmentation of a uint8 batch x (B, C, H, W) with labels y (B,) on their device, with DeiT's
    flags as defaults: crop + flip (RandomResizedCrop above 32 px or with rrc_scale, its smallest area, else the padded
    crop; flip only if cropped), RandAugment (aa) or 3-Augment, normalisation, random erasing (not with 3-Augment, as
    DeiT III), Mixup/CutMix. rng (numpy) draws every choice on the host: seed it per step, e.g. (seed, step, rank), and
    a resumed run repeats it; gen (torch, on x's device) draws the erasing noise. Returns (float images, targets): soft
    targets (B, num_classes), label smoothing folded in, when mixing; else the labels y (then smooth in the loss)."""
    if not cropped and (x.shape[-1] > 32 or rrc_scale is not None):
        x = random_resized_crop(x, rng, x.shape[-1], scale=(rrc_scale or 0.08, 1.0), hflip=hflip)
    elif (crop_pad and not cropped) or hflip:
        x = pad_crop_flip(x, rng, 0 if cropped else crop_pad, hflip)
    if three_aug:
        x = three_augment(x, rng)
    elif aa != "none":
        x = rand_augment(x, rng, fill=tuple(round(255 * m) for m in mean), **parse_aa(aa))  # fill: the mean colour
    x = normalize(x, mean, std)
    if reprob > 0 and not three_aug:
        x = random_erasing(x, rng, reprob, gen=gen)
    if mixup > 0 or cutmix > 0:
        return mixup_cutmix(x, y, num_classes, rng, mixup, cutmix, switch_prob, smoothing)
    return x, y
