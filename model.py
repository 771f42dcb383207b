"""
DeiT: a Vision Transformer with a class token and, in the distilled variants, a distillation token.

Follows Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention"
(arXiv 2012.12877): the architecture is ViT-B/16 and smaller (paper §3, Table 1); the distillation token
(paper §4, Fig. 2) is a second learned token with its own position embedding and its own linear head.
The state_dict has exactly the key names and shapes of the official release files, so

    model = create_model("deit_small_distilled_patch16_224")
    model.load_state_dict(torch.load(path, weights_only=True)["model"])

loads a released checkpoint. This file needs only torch: copy it into your project.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DeiTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    distilled: bool = False
    drop_path_rate: float = 0.0  # DeiT trains with 0.1 (REFERENCE §2); 0 here so inference code needs no flag


# width, depth, heads (paper Table 1). "nano" is this project's size for CPU runs on 28-64 px images;
# it is not in the paper.
SIZES = {
    "nano": (96, 6, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}

# name -> (size, patch, img_size). The eight official variants, then variants for 28-64 px images: a 16-px
# patch would leave a 28-px image with one token; patch 4 gives a 7x7 grid (8x8 at 32 px), patch 7 a 4x4 one.
# Every variant also exists distilled: insert "_distilled" after the size, as in the official names.
_BASE_NAMES = {
    "deit_tiny_patch16_224": ("tiny", 16, 224),
    "deit_small_patch16_224": ("small", 16, 224),
    "deit_base_patch16_224": ("base", 16, 224),
    "deit_base_patch16_384": ("base", 16, 384),
    "deit_nano_patch4_28": ("nano", 4, 28),
    "deit_nano_patch7_28": ("nano", 7, 28),  # train.py's CPU default: 16 tokens, 3x the images/s of patch 4
    "deit_tiny_patch4_32": ("tiny", 4, 32),
    "deit_small_patch4_32": ("small", 4, 32),
}
MODELS = {}
for _name, _spec in _BASE_NAMES.items():
    _size, _rest = _name[len("deit_"):].split("_", 1)
    MODELS[_name] = (*_spec, False)
    MODELS[f"deit_{_size}_distilled_{_rest}"] = (*_spec, True)


def create_model(name, **overrides):
    """Build a variant by name; keyword arguments override any DeiTConfig field (num_classes, img_size,
    drop_path_rate, in_chans, or explicit sizes such as embed_dim=64, depth=2, num_heads=2)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    size, patch, img, distilled = MODELS[name]
    width, depth, heads = SIZES[size]
    cfg = dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, img_size=img, distilled=distilled)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return DeiT(DeiTConfig(**cfg))


class PatchEmbed(nn.Module):
    # A conv with stride = kernel = patch: the same as a linear map of each flattened patch (paper §3).
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.embed_dim % cfg.num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)  # rows ordered q, k, v
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, T, D = x.shape
        # (B, T, 3, nh, hs) -> (3, B, nh, T, hs): the official checkpoints split qkv rows this way
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v, flash kernel on GPU
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in ViT/DeiT, not the tanh approximation


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016), per sample: a residual branch is dropped for a whole image and
    the survivors are scaled by 1/keep so the expectation is unchanged. DeiT needs it: paper Table 8,
    training without it diverges."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)  # eps 1e-6 as the official models
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):  # pre-norm residual blocks
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x


class DeiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.img_size % cfg.patch_size == 0, "img_size must be a multiple of patch_size"
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = 2 if cfg.distilled else 1
        num_patches = (cfg.img_size // cfg.patch_size) ** 2
        # Registration order gives the official checkpoints' key order: cls_token, pos_embed, dist_token, ...
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, D))
        if cfg.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embed = PatchEmbed(cfg)
        # stochastic depth rate rises linearly from 0 at the first block to drop_path_rate at the last
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)
        if cfg.distilled:
            self.head_dist = nn.Linear(D, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        # As the reference: tokens, position embeddings and Linear weights ~ N(0, 0.02) truncated at +-2
        # (absolute, so practically untruncated); biases 0; LayerNorm 1/0; the patch conv keeps
        # PyTorch's default init.
        for p in [self.cls_token, self.pos_embed] + ([self.dist_token] if self.cfg.distilled else []):
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token, self.dist_token] if self.cfg.distilled else [self.cls_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)  # [cls, (dist), patches]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, prefix + N, D)

    def forward_heads(self, x):
        """Logits of every head: the class head alone, or (class_logits, dist_logits) when distilled."""
        x = self.forward_features(x)
        if not self.cfg.distilled:
            return self.head(x[:, 0])
        return self.head(x[:, 0]), self.head_dist(x[:, 1])

    def forward(self, x):
        out = self.forward_heads(x)
        if self.cfg.distilled and not self.training:
            # Paper §4 says the softmax outputs of the two heads are added; the reference code averages
            # the logits. We follow the code, so released checkpoints score as published.
            return (out[0] + out[1]) / 2
        return out


def resize_pos_embed(pos_embed, new_grid, num_prefix_tokens):
    """Resize (1, prefix + g*g, D) position embeddings to a new_grid x new_grid patch grid: the prefix
    (class/distillation) rows are kept as they are, the patch rows are interpolated bicubically as a
    square image. Paper §3 "Fine-tuning at different resolution": bicubic keeps the embeddings' norm,
    bilinear shrinks it."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    assert old * old == grid.shape[1], f"patch rows ({grid.shape[1]}) do not form a square grid"
    if old == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
