"""
DeiT's data augmentation, from scratch, on batched uint8 tensors (B, C, H, W) on any device.

Paper §6 and Table 8: without Mixup and CutMix DeiT-B falls from 81.8 to 75.8% top-1, without RandAugment
to 79.6, and without random erasing training diverges. The reference runs RandAugment image by image in
PIL on the CPU; here every op works on a whole batch on the device, and every image draws its own ops,
magnitudes, boxes and rectangles from a torch.Generator. Semantics: the reference's (timm's auto_augment.py,
mixup.py, random_erasing.py and transforms.py as facebookresearch/deit datasets.py and main.py set them up);
the ops follow PIL's ImageOps / ImageEnhance / Image.transform, and the tests compare them with PIL.

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
    x = img.float()
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # 3x3 box sum as shifted sums: cheaper than a conv
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = (box + 4 * x[:, :, 1:-1, 1:-1]).div_(13).add_(0.5).floor_()  # (sum + 4 centre) / 13, rounded
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, img, factor)


def affine(img, matrix, fill):
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill), batched: output pixel centre
    (x + 0.5, y + 0.5) samples the input at (a x' + b y' + c, d x' + e y' + f); a sample outside the image
    takes the fill colour (PIL's rule); inside, a bicubic with edge pixels repeated, truncated to uint8.
    matrix: (B, 6) in pixels; fill: C values in 0..255.
    Deliberate difference: grid_sample's bicubic is the a = -0.75 cubic, PIL's transform uses a = -1: one
    fused kernel instead of gathering PIL's 16 taps (README, "Differences from the reference"). On the
    bundled 28-px images they differ by about 1 grey level on average, up to ~20 on sharp edges
    (test_ops_match_pil); at integer shifts and quarter turns they agree exactly."""
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
    """Per-image affine matrices (B, 6), (a, b, c, d, e, f), the identity except the named entries."""
    m = torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64, device=arg.device).repeat(len(arg), 1)
    for name, value in entries.items():
        m[:, "abcdef".index(name)] = value.double()
    return m


def rotate(img, degrees, fill=128):
    # PIL Image.rotate(degrees): counter-clockwise about the centre (W/2, H/2), same size
    B, C, H, W = img.shape
    t = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = W / 2, H / 2
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
# RandAugment's 15 ops (timm's "increasing" set, as DeiT's rand-m9-mstd0.5-inc1) and level -> argument.
# level = magnitude / 10 in [0, 1]; sign = +-1 where the op's argument is randomly negated.

def _enhance(level, sign):
    return (1.0 + sign * 0.9 * level).clamp(min=0.1)


OP_ARGS = {  # name -> (op, argument from (level, sign, H, W)), as timm's auto_augment.py LEVEL_TO_ARG
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


def _rand(gen, *shape):
    return torch.rand(shape, generator=gen, device=gen.device)


def rand_augment(images, gen, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=128):
    """DeiT's RandAugment (rand-m9-mstd0.5-inc1): per image, num_ops ops drawn uniformly with replacement,
    each applied with probability prob, with magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10].
    The loop is over op slots and op kinds, never over images: each op runs once on the images that drew it.
    gen: a torch.Generator; its device (CPU or the images' GPU) is where the draws are made."""
    B = images.shape[0]
    images = images.clone()  # written in place below, one op kind at a time
    for _ in range(num_ops):
        which = (_rand(gen, B) * len(OP_NAMES)).long().clamp(max=len(OP_NAMES) - 1)
        apply = _rand(gen, B) < prob
        level = (magnitude + magnitude_std * torch.randn(B, generator=gen, device=gen.device)).clamp(0, 10) / 10
        sign = torch.where(_rand(gen, B) < 0.5, -1.0, 1.0)
        for k, name in enumerate(OP_NAMES):
            idx = ((which == k) & apply).nonzero()[:, 0]
            if len(idx):
                out = apply_op(images[idx.to(images.device)], name, level[idx], sign[idx], fill)
                images.index_copy_(0, idx.to(images.device), out)
    return images


# ---------------------------------------------------------------------------------------------------------
# Crops and flips (uint8, before RandAugment), as the reference's transforms, drawn per image.

def _box_sizes(gen, B, H, W, area, ratio, attempts, fits):
    """Up to `attempts` tries per image of a box of area ~ U(area) * H * W and aspect w/h log-uniform in
    ratio, rounded to pixels; the first try that fits(h, w) wins. Returns h, w (B,) and whether one fit."""
    a = H * W * (area[0] + (area[1] - area[0]) * _rand(gen, B, attempts))
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(gen, B, attempts))
    w, h = torch.sqrt(a * aspect).round(), torch.sqrt(a / aspect).round()
    ok = fits(h, w)
    first = ok.float().argmax(1, keepdim=True)  # the first attempt that fits
    return h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], ok.any(1)


def sample_boxes(gen, B, H, W, scale, ratio, attempts=10):
    """RandomResizedCrop's box per image (torchvision/timm): up to 10 tries of area ~ U(scale) * H * W and
    log-uniform aspect in ratio, the first that fits wins; none fits -> the central crop of the clamped
    ratio. Returns top, left, height, width as (B,) float tensors."""
    h, w, found = _box_sizes(gen, B, H, W, scale, ratio, attempts,
                             lambda h, w: (w > 0) & (h > 0) & (w <= W) & (h <= H))
    # fallback: the whole image cropped to the nearest allowed aspect ratio, centred
    r = W / H
    fw, fh = (W, round(W / ratio[0])) if r < ratio[0] else (round(H * ratio[1]), H) if r > ratio[1] else (W, H)
    h, w = torch.where(found, h, float(fh)), torch.where(found, w, float(fw))
    top = torch.where(found, (_rand(gen, B) * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (_rand(gen, B) * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return top, left, h, w


def random_resized_crop(images, gen, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5):
    """RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip p hflip, batched: each image gets its
    own box, resampled to size x size with the a = -0.75 bicubic of grid_sample (no antialias: the images
    this path serves are small and mostly upsampled; decoded files are cropped in PIL). One fused kernel
    instead of PIL's a = -0.5 cubic (README, "Differences from the reference")."""
    B, C, H, W = images.shape
    top, left, h, w = (t.to(images.device) for t in sample_boxes(gen, B, H, W, scale, ratio))
    flip = (_rand(gen, B) < hflip).to(images.device)
    # output pixel centre u in (0, 1) maps to x = left + u * w in pixels, then to grid_sample's [-1, 1]
    u = (torch.arange(size, device=images.device) + 0.5) / size
    gx = (left[:, None] + u * w[:, None]) * 2 / W - 1  # (B, size)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    gy = (top[:, None] + u * h[:, None]) * 2 / H - 1
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def pad_crop_flip(images, gen, pad=4, hflip=0.5):
    """RandomCrop(size, padding=pad) + horizontal flip, DeiT's crop for inputs of 32 px or less: zero
    padding, every image its own offset and flip."""
    B, C, H, W = images.shape
    dev = images.device
    top, left = ((_rand(gen, B) * (2 * pad + 1)).long().to(dev) for _ in range(2))
    flip = (_rand(gen, B) < hflip).to(dev)
    xp = F.pad(images, (pad, pad, pad, pad))
    rows = (top[:, None] + torch.arange(H, device=dev))[:, :, None]  # (B, H, 1)
    cols = left[:, None] + torch.arange(W, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    return xp[torch.arange(B, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B,H,W,C) -> (B,C,H,W)


def three_augment(images, gen, jitter=0.3):
    """DeiT III's 3-Augment (Touvron et al. 2022, §2.3): per image one of grayscale, solarize (threshold 128),
    gaussian blur (sigma U(0.1, 2)), then colour jitter 0.3 (brightness, contrast, saturation factors
    ~ U(0.7, 1.3)). Simplifications, deliberate: the jitter always runs in that order (torchvision shuffles
    it per image) and the blur kernel is cut at radius 4 (PIL approximates the gaussian with box blurs)."""
    B, C, H, W = images.shape
    dev = images.device
    which = (_rand(gen, B) * 3).long().clamp(max=2).to(dev)
    sigma = (0.1 + 1.9 * _rand(gen, B)).to(dev)
    ops = (lambda x, s: _grey(x).expand(x.shape).to(torch.uint8),
           lambda x, s: solarize(x, torch.full((len(x),), 128.0, device=dev)),
           _gaussian_blur)
    out = images.clone()
    for k, op in enumerate(ops):  # each op only on the images that drew it
        idx = (which == k).nonzero()[:, 0]
        if len(idx):
            out.index_copy_(0, idx, op(images[idx], sigma[idx]))
    for op in (brightness, contrast, color):  # factors ~ U(1 - jitter, 1 + jitter)
        out = op(out, (1 - jitter + 2 * jitter * _rand(gen, B)).to(dev))
    return out


def _gaussian_blur(images, sigma):
    # separable gaussian, per-image sigma, kernel radius 4 (covers 2 sigma at the largest sigma 2)
    r = torch.arange(-4, 5, device=images.device, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 9)
    B, C, H, W = images.shape
    x = F.pad(images.float(), (4, 4, 4, 4), mode="replicate")
    x = x.unfold(3, 9, 1) @ k[:, None, None, :, None]  # along W: (B, C, H+8, W, 9) @ (B, 1, 1, 9, 1)
    x = x[..., 0].unfold(2, 9, 1) @ k[:, None, None, :, None]  # along H
    return x[..., 0].round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# After normalisation (float): random erasing, then Mixup / CutMix on the batch with soft targets.

def normalize(x, mean, std):
    """uint8 (B, C, H, W) -> (x / 255 - mean) / std as float, in one pass after the cast."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return torch.addcmul(-mean / std, x.float(), 1 / (255 * std))


def random_erasing(x, gen, p=0.25, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts=10):
    """Random erasing (Zhong et al. 2017) as DeiT: with probability p per image, one rectangle of area
    ~ U(area) * H * W and log-uniform aspect, the first of 10 tries that fits, filled with N(0, 1) per
    value (mode "pixel", on normalised images). x: normalised float (B, C, H, W), erased in place (as timm)."""
    B, C, H, W = x.shape
    # timm draws the aspect as h/w; the range is symmetric (0.3 .. 1/0.3), so w/h has the same law
    h, w, fits = _box_sizes(gen, B, H, W, area, ratio, attempts, lambda h, w: (h < H) & (w < W))
    erase = fits & (_rand(gen, B) < p)
    top = (_rand(gen, B) * (H - h + 1)).floor()
    left = (_rand(gen, B) * (W - w + 1)).floor()
    ys, xs = torch.arange(H, device=gen.device), torch.arange(W, device=gen.device)
    inside = ((ys[None, :, None] >= top[:, None, None]) & (ys[None, :, None] < (top + h)[:, None, None])
              & (xs[None, None, :] >= left[:, None, None]) & (xs[None, None, :] < (left + w)[:, None, None]))
    mask = (inside & _col(erase)[:, 0]).to(x.device)[:, None]  # (B, 1, H, W)
    idx = erase.nonzero()[:, 0].to(x.device)  # noise only for the images erased
    noise = torch.randn((len(idx), *x.shape[1:]), generator=gen, device=gen.device).to(x.device, x.dtype)
    return x.index_copy_(0, idx, torch.where(mask[idx], noise, x[idx]))


def _beta(a, gen):
    """One draw of Beta(a, a) from uniforms (Johnk's method), so that the generator alone fixes it."""
    if a == 1.0:
        return _rand(gen, 1).item()
    while True:
        u, v = (_rand(gen, 2) ** torch.tensor([1 / a, 1 / a], device=gen.device)).tolist()
        if 0 < u + v <= 1:
            return u / (u + v)


def smooth_one_hot(y, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


def mixup_cutmix(x, y, num_classes, gen, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), one per batch, as DeiT: the partner of image i
    is image B-1-i (the flipped batch, any batch size); CutMix (probability switch_prob) pastes a box whose
    area is 1 - lam, clipped to the image, and lam is recomputed from the pasted area. Targets: the
    label-smoothed one-hots of the pair, weighted lam and 1 - lam. Returns (images, targets (B, classes));
    the images are mixed in place (as timm)."""
    B, C, H, W = x.shape
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or _rand(gen, 1).item() < switch_prob)
    if use_cutmix:
        lam = _beta(cutmix_alpha, gen)
        r = math.sqrt(1 - lam)
        cut_h, cut_w = int(H * r), int(W * r)
        cy, cx = int(_rand(gen, 1).item() * H), int(_rand(gen, 1).item() * W)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x[:, :, y1:y2, x1:x2] = x[:, :, y1:y2, x1:x2].flip(0)  # flip() copies the box first
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
    elif mixup_alpha > 0:
        lam = _beta(mixup_alpha, gen)
        partner = x.flip(0)  # a copy, taken before x changes
        x = x.mul_(lam).add_(partner, alpha=1 - lam)
    else:
        lam = 1.0
    t = smooth_one_hot(y, num_classes, smoothing)
    return x, lam * t + (1 - lam) * t.flip(0)
