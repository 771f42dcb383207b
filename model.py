"""
DeiT (Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention", arXiv
2012.12877): ViT-B/16 and smaller (paper §3, Table 1) with a class token and, if distilled, a distillation token
(paper §4, Fig. 2) with its own position embedding and head. "The reference" below is facebookresearch/deit
models.py, built on timm's vision_transformer.py. The state_dict has the official files' key names and shapes, so

    model = create_model("deit_small_distilled_patch16_224", pretrained=True)  # DeiT's release, downloaded once
    load_weights(model, "deit_small_distilled_patch16_224-649709d9.pth")  # or a file: a release, ours, a state dict

and a wrong file is one clear ValueError. This file needs only torch (safetensors for .safetensors files): copy it
into your project.
"""

import functools
import math
import os
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DeiTConfig:
    img_size: int = 224  # or (height, width)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    distilled: bool = False
    drop_path_rate: float = 0.0  # DeiT trains with 0.1 (paper Table 9); 0 here so inference code needs no flag
    global_pool: bool = False  # classify the mean of the patch tokens (MAE's fine-tuning) instead of the class token


# width, depth, heads (paper Table 1); "nano", this project's size for CPU runs on 28-64 px images, is not in it
SIZES = {"nano": (96, 6, 3), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
         "large": (1024, 24, 16), "huge": (1280, 32, 16)}  # ViT-L/16, ViT-H/14: MAE's releases (RELEASES below)

Variant = namedtuple("Variant", "size patch_size img_size distilled")  # size: a key of SIZES
# The official variants, then ones for 28-64 px images (a 16-px patch would leave a 28-px image one token): patch 4
# gives a 7x7 grid (8x8 at 32 px), patch 7 a 4x4 one (train.py's CPU default: 3x the images/s of patch 4).
MODELS = {}
for _name, _size, _patch, _img in [
        ("deit_tiny_patch16_224", "tiny", 16, 224), ("deit_small_patch16_224", "small", 16, 224),
        ("deit_base_patch16_224", "base", 16, 224), ("deit_base_patch16_384", "base", 16, 384),
        ("deit_nano_patch4_28", "nano", 4, 28), ("deit_nano_patch7_28", "nano", 7, 28),
        ("deit_tiny_patch4_32", "tiny", 4, 32), ("deit_small_patch4_32", "small", 4, 32)]:
    MODELS[_name] = Variant(_size, _patch, _img, False)
    MODELS[_name.replace(f"_{_size}_", f"_{_size}_distilled_")] = Variant(_size, _patch, _img, True)
MODELS.update(vit_large_patch16_224=Variant("large", 16, 224, False), vit_huge_patch14_224=Variant("huge", 14, 224, False))

# Released weights by name -> URL: DeiT's eight (the hash in each file name is the start of its sha256; README of
# facebookresearch/deit), DeiT's RegNetY-16GF teacher (timm's key names: distill.py maps them) and MAE's encoders
# (facebookresearch/mae README: pretrained, and fine-tuned on ImageNet with global pool). fetch() downloads them.
DEIT_URL, MAE_URL = "https://dl.fbaipublicfiles.com/deit/", "https://dl.fbaipublicfiles.com/mae/"
RELEASES = {n.split("-")[0]: f"{DEIT_URL}{n}.pth" for n in (
    "deit_tiny_patch16_224-a1311bcf", "deit_small_patch16_224-cd65a155", "deit_base_patch16_224-b5f2ef4d",
    "deit_tiny_distilled_patch16_224-b40b3cf7", "deit_small_distilled_patch16_224-649709d9",
    "deit_base_distilled_patch16_224-df68dfff", "deit_base_patch16_384-8de9b5d1",
    "deit_base_distilled_patch16_384-d0272ac0", "regnety_160-a5fe301d")}
MAE_MODELS = {"base": "deit_base_patch16_224", "large": "vit_large_patch16_224", "huge": "vit_huge_patch14_224"}
for _size in MAE_MODELS:
    RELEASES[f"mae_pretrain_vit_{_size}"] = f"{MAE_URL}pretrain/mae_pretrain_vit_{_size}.pth"
    RELEASES[f"mae_finetuned_vit_{_size}"] = f"{MAE_URL}finetune/mae_finetuned_vit_{_size}.pth"


def release_model(name):
    """The model a release's weights fit (a DeiT release: its own name; MAE's: its ViT), else None (the teacher, or
    not a release)."""
    if name not in RELEASES:
        return None
    return name if name in MODELS else MAE_MODELS.get(name.rsplit("_", 1)[-1]) if name.startswith("mae_") else None


def variant(name):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def distilled(model):
    """Whether model has a distillation token: a DeiT's cfg says so; other models (torchvision's) have none."""
    return getattr(getattr(model, "cfg", None), "distilled", False)


def create_model(name, pretrained=False, **overrides):
    """A variant by name; keyword arguments override any DeiTConfig field (num_classes, img_size, depth=2, ...).
    pretrained: with DeiT's released weights of that name (RELEASES), downloaded once."""
    if pretrained:
        if name not in RELEASES:
            raise ValueError(f"no released weights for {name}: releases are {', '.join(n for n in RELEASES if n in MODELS)}")
        return load_weights(create_model(name, **overrides), name)
    v = variant(name)
    width, depth, heads = SIZES[v.size]
    cfg = dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=v.patch_size, img_size=v.img_size,
               distilled=v.distilled)
    return DeiT(DeiTConfig(**{**cfg, **{k: x for k, x in overrides.items() if x is not None}}))


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
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)  # rows ordered q, k, v
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def split_qkv(self, x):
        B, T, D = x.shape
        # (B, T, 3, nh, hs) -> (3, B, nh, T, hs): the official checkpoints split qkv rows this way
        return self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.split_qkv(x)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v, flash kernel on GPU
        return self.proj(x.transpose(1, 2).flatten(2))

    def weights(self, x):
        """The attention weights forward applies, (B, heads, T, T), which it never materialises: for looking."""
        q, k, _ = self.split_qkv(x)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in ViT/DeiT, not the tanh approximation


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016), per sample: a residual branch is dropped for a whole image and the
    survivors scaled by 1/keep (the same expectation). DeiT needs it: paper Table 8, without it training diverges."""
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
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class DeiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, W = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = 2 if cfg.distilled else 1
        self.grid = (H // cfg.patch_size, W // cfg.patch_size)  # the patch grid pos_embed was made for
        # Registration order gives the official checkpoints' key order: cls_token, pos_embed, dist_token, ...
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + self.num_prefix_tokens, D))
        if cfg.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embed = PatchEmbed(cfg)
        # stochastic depth rate rises linearly from 0 at the first block to drop_path_rate at the last
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        if cfg.global_pool and cfg.distilled:
            raise ValueError("global_pool replaces the class token's output: it has no distilled variant")
        # global_pool: MAE's models_vit.py, whose fc_norm normalises the pooled patch tokens in place of the final norm
        self.norm = nn.Identity() if cfg.global_pool else nn.LayerNorm(D, eps=1e-6)
        if cfg.global_pool:
            self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)
        if cfg.distilled:
            self.head_dist = nn.Linear(D, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        # As the reference (a, b absolute: practically untruncated); LayerNorms and the patch conv keep PyTorch's init
        for p in [self.cls_token, self.pos_embed] + ([self.dist_token] if self.cfg.distilled else []):
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Exempt from weight decay besides 1-D parameters, as the reference (timm 0.3.2): it too decays dist_token."""
        return {"pos_embed", "cls_token"}

    def layer_id(self, name):
        """A parameter's depth for layer-wise lr decay (param_groups), as MAE's util/lr_decay.py."""
        if name in ("cls_token", "dist_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1

    def embed(self, x):
        """Images -> [cls, (dist), patches] + pos_embed (B, prefix + N, D), at any size the patch divides."""
        (H, W), p = x.shape[-2:], self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"a {H}x{W} input is not a multiple of the patch size {p}: pad or resize it to "
                             f"{-(-H // p) * p}x{-(-W // p) * p}")
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token, self.dist_token] if self.cfg.distilled else [self.cls_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        return x + self.pos_embed_at((H // p, W // p))

    def pos_embed_at(self, grid):
        """pos_embed for a (rows, columns) patch grid: the model's own, or resized as resize_pos_embed does, here by
        one cached matrix per grid, so the embeddings keep training and a loop at a fixed size pays one matmul."""
        if grid == self.grid:
            return self.pos_embed
        P, pe = self.num_prefix_tokens, self.pos_embed
        M = resize_matrix(self.grid, grid, pe.device)
        return torch.cat([pe[:, :P], (M @ pe[0, P:].float()).to(pe.dtype)[None]], dim=1)

    def forward_features(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, prefix + N, D)

    def forward_intermediates(self, x, depth=None):
        """The tokens after each of the first depth blocks, before the final norm: (B, prefix + N, D) tensors, for a
        detector's backbone (feature_maps) or a look at what the class and distillation tokens become (paper §4)."""
        x, out = self.embed(x), []
        for block in self.blocks[:depth]:
            x = block(x)
            out.append(x)
        return out

    def feature_maps(self, x, blocks=(-1,)):
        """The patch tokens after the chosen blocks as (B, D, H/p, W/p) maps, as a convnet's (prefix tokens dropped)."""
        B, (H, W), p = x.shape[0], x.shape[-2:], self.cfg.patch_size
        blocks = [b % len(self.blocks) for b in blocks]
        tokens = self.forward_intermediates(x, max(blocks) + 1)
        return [tokens[b][:, self.num_prefix_tokens:].transpose(1, 2).reshape(B, -1, H // p, W // p) for b in blocks]

    def forward_heads(self, x):
        """Logits of every head: the class head alone, or (class_logits, dist_logits) when distilled."""
        x = self.forward_features(x)
        if self.cfg.global_pool:
            return self.head(self.fc_norm(x[:, self.num_prefix_tokens:].mean(1)))
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


def param_groups(model, weight_decay, layer_decay=1.0):
    """AdamW's parameter groups for any model: no decay on 1-D parameters and no_weight_decay(), as the reference.
    layer_decay < 1 (MAE's fine-tuning, BEiT's idea): a group's "lr_scale" is layer_decay ** (depth + 1 - layer_id)."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            wd = 0.0 if p.ndim <= 1 or name in exempt else weight_decay
            scale = layer_decay ** (len(model.blocks) + 1 - model.layer_id(name)) if layer_decay != 1.0 else 1.0
            groups.setdefault((wd, scale), {"params": [], "weight_decay": wd, "lr_scale": scale})["params"].append(p)
    return sorted(groups.values(), key=lambda g: (-g["weight_decay"], g["lr_scale"]))


def resize_pos_embed(pos_embed, new_grid, num_prefix_tokens):
    """Resize (1, prefix + g*g, D) position embeddings to a new_grid patch grid (n for n x n, or (rows, columns)): the
    prefix (class/distillation) rows are kept as they are, the patch rows are interpolated bicubically as a square
    image. Paper §3 "Fine-tuning at different resolution": bicubic keeps the embeddings' norm, bilinear shrinks it."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    assert old * old == grid.shape[1], f"patch rows ({grid.shape[1]}) do not form a square grid"
    new = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if (old, old) == new:
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


@functools.cache
def resize_matrix(old, new, device):
    """The (new rows * columns, old rows * columns) matrix of bicubic resizing from grid old to grid new:
    interpolation is linear, so resizing every channel is one matmul. Made once per grids and device."""
    eye = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    M = F.interpolate(eye, size=tuple(new), mode="bicubic", align_corners=False).flatten(1).T
    return M.float().to(device)


# ----------------------------------------------------------------------------------------------------------
# Weights files: official releases, train.py's checkpoints or plain state dicts with these key names (timm's ViT/DeiT).

def load_weights(model, path, ema=False):
    """Load a weights file into model (its EMA weights with ema, for a train.py checkpoint); returns model."""
    state = state_dict_of(read_file(path), path, ema)
    load_checked(model, fit_pos_embed(state, model), path)
    return model


def check_file(path, what):
    if path not in RELEASES and not os.path.isfile(path):
        raise ValueError(f"{what} {path} " + ("is a directory, not a file" if os.path.isdir(path) else "does not exist"))


def read_file(path, what="weights file"):
    """A file's contents on the CPU, never running pickled code: torch.load with weights_only=True, or a .safetensors
    file (the format holds only tensors; needs the safetensors package). A release name (RELEASES): fetch(path)."""
    if path in RELEASES:
        return fetch(path)
    check_file(path, what)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): a copy or a download that did not finish?")
    try:
        if str(path).endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"reading {path} needs the safetensors package: pip install safetensors") from None
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None


def fetch(name):
    """A release by name, read from torch.hub's cache ($TORCH_HOME/hub/checkpoints), downloaded there once with a
    progress bar and the sha256 start its file name carries checked: torch.hub.load_state_dict_from_url does it all."""
    url = RELEASES[name]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # unreachable, refused, a wrong hash (the part file is removed) or a damaged cached file
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        if os.path.isfile(path):
            raise ValueError(f"cannot read {path} ({why}): delete it to download {name} again") from None
        if "invalid hash" in why:
            raise ValueError(f"{url} is not the file its name promises ({why}); nothing was kept") from None
        raise ValueError(f"cannot download {name} from {url} ({why}); offline? Download it by hand to {path}") from None


def state_dict_of(obj, path, ema=False):
    """The state dict in what read_file returned: "model" (official, ours), "ema" (ours), or all (plain)."""
    if ema:
        if not (isinstance(obj, dict) and "config" in obj):
            raise ValueError(f"{path} is not a train.py checkpoint: it holds one set of weights, no EMA")
        if obj.get("ema") is None:
            raise ValueError(f"{path} has no EMA weights (trained with --no-model-ema)")
        obj = obj["ema"]
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (nor a checkpoint holding one under 'model')")
    return state


def fit_pos_embed(state, model):
    """Weights of another resolution: pos_embed resized to the model's grid; other mismatches are load_checked's."""
    pe, own = state.get("pos_embed"), getattr(model, "pos_embed", None)  # (a convnet teacher has none)
    if pe is None or own is None or pe.ndim != 3 or pe.shape[1] == own.shape[1] or pe.shape[2] != own.shape[2]:
        return state
    prefix = model.num_prefix_tokens
    if math.isqrt(pe.shape[1] - prefix) ** 2 != pe.shape[1] - prefix:
        return state
    return {**state, "pos_embed": resize_pos_embed(pe, model.grid, prefix)}


def fit_in_chans(state, key, in_chans, what):
    """RGB weights for greyscale images: first-layer filters summed over R, G, B (a grey pixel has R = G = B)."""
    w = state[key]
    if w.shape[1] == in_chans:
        return state
    if in_chans != 1:
        raise ValueError(f"{what} takes {w.shape[1]}-channel images, the data has {in_chans}")
    return {**state, key: w.sum(1, keepdim=True)}


def load_checked(model, state, what):
    """Strict load_state_dict for any nn.Module, but a mismatch is one line naming keys and shapes, not a traceback."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{n}: {', '.join(xs[:4])}" + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
                for n, xs in (("missing keys", missing), ("unexpected keys", unexpected),
                              ("shape (checkpoint vs model)", shapes)) if xs]
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# A DeiT as a detector's backbone instead of a ResNet-50-FPN: ViTDet's recipe (Li et al. 2022, "Exploring Plain Vision
# Transformer Backbones for Object Detection", arXiv 2203.16527, §3), a pyramid from the ViT's last map, no FPN
# top-down path. Global attention in every block: ViTDet's windows and relative positions are a cost cut at 1024 px.

class LayerNorm2d(nn.LayerNorm):  # over the channels of (B, C, H, W) maps (ViTDet's norm in the pyramid)
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (§3, Fig. 2c) from one (B, dim, H/p, W/p) map: strides 4, 8, 16, 32 from p by
    2x2 deconvs (LayerNorm and GELU between two) or a max-pool, then 1x1 and 3x3 convs to out_channels, each with a
    LayerNorm; plus "pool", torchvision FPN backbones' stride-64 level (LastLevelMaxPool): keys "0"-"3" and "pool"."""

    def __init__(self, dim, patch_size, out_channels=256, strides=(4, 8, 16, 32)):
        super().__init__()
        p = patch_size
        if p & (p - 1) or any(s & (s - 1) for s in strides):
            raise ValueError(f"the pyramid needs a power-of-2 patch size (strides {strides} in halvings and "
                             f"doublings of it), not {p}: choose a patch4/patch16 model")
        self.stages = nn.ModuleList()
        for s in strides:
            ops, d = [], dim
            for i in range(int(math.log2(p // s)) if s < p else 0):  # upsample: p/s = 2, 4, ...
                ops += [LayerNorm2d(d, eps=1e-6), nn.GELU()] if i else []
                ops.append(nn.ConvTranspose2d(d, d // 2, kernel_size=2, stride=2))
                d //= 2
            if s > p:
                ops.append(nn.MaxPool2d(kernel_size=s // p, stride=s // p))
            ops += [nn.Conv2d(d, out_channels, 1, bias=False), LayerNorm2d(out_channels, eps=1e-6),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels, eps=1e-6)]
            self.stages.append(nn.Sequential(*ops))

    def forward(self, x):
        maps = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        maps["pool"] = F.max_pool2d(maps[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return maps


TRUNK = ("cls_token", "dist_token", "pos_embed", "patch_embed.", "blocks.")  # what a backbone keeps of a ViT


class Backbone(nn.Module):
    """A DeiT and ViTDet's pyramid, as torchvision's detectors take a backbone: forward(images) returns an OrderedDict
    of (B, out_channels, H/s, W/s) maps keyed as a ResNet-50-FPN's, and out_channels says their width, so

        backbone = Backbone.from_file("deit_small_patch16_224-cd65a155.pth", "deit_small_patch16_224")
        detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)

    is the swap. The ViT's heads and final norm are dropped (ViTDet reads the last block's tokens)."""

    def __init__(self, vit, out_channels=256):
        super().__init__()
        for name in ("head", "head_dist", "fc_norm", "norm"):
            if hasattr(vit, name):
                setattr(vit, name, nn.Identity())
        self.vit, self.out_channels = vit, out_channels
        self.pyramid = SimpleFeaturePyramid(vit.cfg.embed_dim, vit.cfg.patch_size, out_channels)

    def forward(self, x):
        return self.pyramid(self.vit.feature_maps(x)[0])

    # for param_groups (layer-wise lr decay, as ViTDet fine-tunes): the pyramid trains at the full lr
    @property
    def blocks(self):
        return self.vit.blocks

    def layer_id(self, name):
        return self.vit.layer_id(name[len("vit."):]) if name.startswith("vit.") else len(self.blocks) + 1

    def no_weight_decay(self):
        return {"vit." + n for n in self.vit.no_weight_decay()}

    @classmethod
    def from_file(cls, path, model=None, out_channels=256, ema=False, **overrides):
        """A backbone from a release by name, a release file or a plain state dict (model names the architecture) or a train.py,
        finetune.py or mae.py checkpoint (which names its own). Only the ViT's trunk is loaded; .left_out names the rest
        (heads, final norm, MAE decoder). overrides: DeiTConfig fields, e.g. img_size (position embeddings resized at
        load, paper §3, as deit's main.py does) or distilled=False (dist_token dropped)."""
        obj, model = read_file(path), model or release_model(path)
        state = state_dict_of(obj, path, ema)
        if "patch_embed.proj.weight" not in state:
            raise ValueError(f"{path} is not a ViT/DeiT weights file (no patch_embed.proj.weight); its keys begin: "
                             + ", ".join(list(state)[:3]))
        if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict) and "embed_dim" in obj["model_config"]:
            vit = DeiT(DeiTConfig(**{**obj["model_config"], "global_pool": False, **overrides}))
        elif model is not None:
            vit = create_model(model, **{"distilled": "dist_token" in state, **overrides})
        else:
            raise ValueError(f"{path} does not say its architecture (an official release or a plain state "
                             "dict): name the model, e.g. deit_small_patch16_224")
        backbone = cls(vit, out_channels)
        trunk = fit_in_chans({k: v for k, v in state.items() if k.startswith(TRUNK)}, "patch_embed.proj.weight",
                             vit.cfg.in_chans, path)
        trunk = trunk if vit.cfg.distilled else drop_dist_token(trunk)
        load_checked(backbone.vit, fit_pos_embed(trunk, vit), path)
        backbone.left_out = sorted({k.split(".")[0] for k in state if k not in backbone.vit.state_dict()})
        return backbone


def drop_dist_token(state):
    """Distilled weights for a plain DeiT, the same network: dist_token and its pos_embed row (the second) dropped."""
    if "dist_token" not in state:
        return state
    pe = state["pos_embed"]
    return {**{k: v for k, v in state.items() if k != "dist_token"}, "pos_embed": torch.cat([pe[:, :1], pe[:, 2:]], 1)}
