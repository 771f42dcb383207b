"""
Fine-tune pretrained DeiT weights on a new task: keep the backbone, give it a new head, train.

    python finetune.py --weights deit_tiny_patch16_224 --data cifar10             # a release by name: downloaded
    python finetune.py --weights out-04/ckpt.pt --classes 5-9 --out-dir out-59   # ours (train.py --classes 0-4)
    python finetune.py --weights deit_base_patch16_224 --model deit_base_patch16_384 --recipe 384 \
        --data /imagenet --batch-size 256            # the paper's 224 -> 384 fine-tune (paper §3, Table 7)
    python finetune.py --weights out/ckpt.pt --freeze ...                         # linear probe

Classification pretraining teaches the backbone to map each class to its own cluster of features, which a new head
reuses (paper §5.3, transfer, Tables 6-7). Weights: a release by name (model.RELEASES), our checkpoints (--use-ema:
the EMA's), DeiT's or timm's files (.pth, .safetensors) or a state dict with the same key names. All else is
train.py's, with a recipe (RECIPES) as defaults: transfer to a new task, the reference's 384 fine-tune, or MAE's.
"""

import argparse

import torch

import train as T
from launch import check_model, cli, start
from distill import CONVNETS, ours
from model import (MODELS, RELEASES, drop_dist_token, fit_in_chans, fit_pos_embed, load_checked, read_file,
                   release_model, state_dict_of)


def get_parser():
    p = T.get_parser()
    p.prog = "finetune.py"
    p.description = "Fine-tune pretrained DeiT weights on a new task (every train.py flag works here too)."
    a = p.add_argument
    a("--weights", help="pretrained weights (required): a release name (deit_small_patch16_224, mae_pretrain_vit_base, "
      "...), our ckpt.pt, a DeiT or timm file (.pth, .safetensors), or a state dict")
    a("--recipe", choices=["transfer", "384", "mae"], default=None, help="defaults for the rest (RECIPES): transfer "
      "(a new task), 384 (the reference's fine-tune to 384 px on ImageNet's classes) or mae (MAE's); default: mae "
      "for MAE's encoders, else transfer")
    a("--use-ema", action="store_true", help="take the EMA weights of our checkpoint instead of the model's")
    a("--freeze", action="store_true", help="linear probe: freeze the backbone, train only the head(s)")
    a("--plain", action="store_true", help="make a distilled checkpoint a plain model (drop dist_token, head_dist)")
    a("--keep-head", action="store_true", help="keep the pretrained head(s) (same classes) instead of new ones")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay: block i of L trains at lr x decay^(L - i) "
      "(MAE's fine-tuning: 0.75; 0.65 for ViT-B in its code); 1: off")
    a("--head-init-std", type=float, default=None, help="draw the new head's weights from a truncated normal "
      "with this std (MAE's fine-tuning: 2e-5), biases 0; default: the model's own init (DeiT's: std 0.02)")
    a("--global-pool", action=argparse.BooleanOptionalAction, default=None, help="classify the mean of the patch "
      "tokens (MAE's fine-tuning) instead of the class token; default: as the checkpoint's model, on for MAE's")
    p.set_defaults(model=None, out_dir="out-finetune", script=p.prog)
    p.ranges.update(layer_decay="(0, 1]", head_init_std="(0, inf)")
    return p


# MAE's fine-tune recipe, the default for MAE's encoders (DeiT's 384 recipe, 5e-6, leaves an MAE encoder where it
# was): facebookresearch/mae main_finetune.py with FINETUNE.md's ViT-B command (MAE §A.1); DeiT's augmentation.
MAE_FINETUNE = dict(lr=1e-3, layer_decay=0.65, weight_decay=0.05, drop_path=0.1, epochs=100, warmup_epochs=5,
                    warmup_lr=0.0, min_lr=1e-6, sched="mae", head_init_std=2e-5, global_pool=True, model_ema=False,
                    repeated_aug=False)  # lr per 512 images: MAE's base lr 5e-4 per 256
RECIPES = {  # lr: per 512 images, scaled to the global batch as in train.py
    # A new task (paper §5.3, Tables 6-7): a new head, the images resized to the model's size, DeiT's training recipe
    # with MAE's fine-tuning lr (1e-3 per 512; DeiT's 5e-4 is for 300 epochs from scratch, and at the batches of 64-128
    # used here it scales to a crawl: test_all.py measures both) and one epoch of warm-up.
    "transfer": dict(lr=1e-3, epochs=30, warmup_epochs=1),
    # The reference's fine-tune to 384 px on ImageNet's own classes (its README). A quirk we keep: at any global batch
    # up to 512 (it used 32 per GPU) the scaled peak lr is at most the min lr, so the "cosine decay" is flat or climbs
    # to 5e-6; on a new task it learns almost nothing (test_all.py measures it).
    "384": dict(lr=5e-6, weight_decay=1e-8, epochs=30, min_lr=5e-6),
    "mae": MAE_FINETUNE}


def weights_defaults(args):
    """Defaults from the weights (launch.start): their model (a checkpoint of ours: its own, with its global pool; a
    release: its architecture) and --recipe's, by default mae for MAE's encoders (mae.py's, MAE's releases)."""
    ckpt = read_file(args.weights) if args.weights and args.weights not in RELEASES else None
    mae, out = False, {}
    if args.weights in RELEASES:
        mae = args.weights.startswith("mae_")  # MAE's encoders: its recipe, with global pool
        out = {"model": release_model(args.weights), **({"global_pool": True} if mae else {})}
    elif ours(ckpt):
        config, pool = ckpt["config"], ckpt["model_config"].get("global_pool")
        mae = "mask_ratio" in config and not config.get("probe")
        out = {"model": config.get("model"), **({"global_pool": True} if pool else {})}
    return {**out, **RECIPES[args.recipe or ("mae" if mae else "transfer")]}


def read_weights(args):
    """The state dict to start from (EMA with --use-ema)."""
    if args.weights is None:
        raise ValueError("finetune.py needs --weights: a release name, our ckpt.pt, a DeiT or timm file, or a state dict")
    state = state_dict_of(read_file(args.weights), args.weights, ema=args.use_ema)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{args.weights} is not a ViT/DeiT state dict (no patch_embed.proj.weight / pos_embed); "
                         f"its keys begin: {', '.join(list(state)[:4])}")
    return state


def adapt(state, model, args):
    """Fit a pretrained state dict to model: check the architecture, convert distilled <-> plain, resize the position
    embeddings, drop the old heads. Returns (the state to load, the keys left to fresh init, notes for the log)."""
    own, cfg = model.state_dict(), model.cfg
    w = state["patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for what, theirs, mine in (("width", w.shape[0], cfg.embed_dim), ("patch size", w.shape[-1], cfg.patch_size),
                               ("depth", depth, cfg.depth)):
        if theirs != mine:
            raise ValueError(f"{args.weights} has {what} {theirs}, {args.model} has {mine}: choose the matching --model")
    state, notes = dict(state), []
    if w.shape[1] != cfg.in_chans:  # e.g. ImageNet (RGB) weights on greyscale data
        state = fit_in_chans(state, "patch_embed.proj.weight", cfg.in_chans, args.weights)
        notes.append(f"patch_embed.proj.weight summed over its {w.shape[1]} input channels (greyscale data)")
    if "dist_token" in state and not cfg.distilled:  # distilled -> plain: drop the token, its head and its pos row
        state = {k: v for k, v in drop_dist_token(state).items() if not k.startswith("head_dist.")}
        notes.append("dropped dist_token, head_dist and the distillation row of pos_embed (plain model)")
    elif cfg.distilled and "dist_token" not in state:  # plain -> distilled: a fresh token, a pos row from the model
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], own["pos_embed"][:, 1:2], state["pos_embed"][:, 1:]], 1)
        notes.append("a new dist_token with a new pos_embed row (the checkpoint is not distilled)")
    old = tuple(state["pos_embed"].shape)
    state = fit_pos_embed(state, model)
    if tuple(state["pos_embed"].shape) != old:
        notes.append(f"pos_embed resized bicubically {old} -> {tuple(state['pos_embed'].shape)} (paper §3)")
    heads = [k for k in state if k.startswith(("head.", "head_dist."))]
    if args.keep_head:
        theirs = state["head.weight"].shape[0] if "head.weight" in state else None
        if theirs != cfg.num_classes:
            raise ValueError(f"--keep-head: the pretrained head has {theirs} classes, the data {cfg.num_classes}; "
                             "leave out --keep-head for a new head")
    else:
        state = {k: v for k, v in state.items() if k not in heads}
        notes.append(f"left out the pretrained head(s): {', '.join(heads)}" if heads else "no pretrained head")
    extra = [k for k in state if k not in own]  # an MAE checkpoint's decoder; norm.* under --global-pool
    if extra:
        state = {k: v for k, v in state.items() if k in own}
        notes.append(f"left out what the model has not: {', '.join(sorted({k.split('.')[0] for k in extra}))} "
                     f"({len(extra)} tensors)")
    return state, [k for k in own if k not in state], notes


def main(argv=None):
    args, ctx, log = start(get_parser(), argv, weights_defaults)
    state = read_weights(args)
    if args.model is None:
        raise ValueError(f"{args.weights} does not say its architecture: give --model (one of {', '.join(MODELS)})")
    if args.plain:  # the plain variant of a distilled name
        args.model = args.model.replace("_distilled", "")
    if args.model in CONVNETS:
        raise ValueError(f"finetune.py fine-tunes DeiT models, not {args.model}")
    img_size = check_model(args, T.DEFAULT_MODEL, ctx, kept=0.0 if args.freeze else 1.0)  # frozen: no activations kept
    if args.freeze:
        args.drop_path = 0.0  # a frozen backbone computes features; stochastic depth would only add noise
    data = T.load(args, ctx.device, img_size)
    if data.tensors and data.source_size != img_size:  # the paper's transfer resizes too (CIFAR's 32 px to 224)
        log(f"images resized {data.source_size} -> {img_size} px, the model's size: {(img_size / data.source_size) ** 2:.0f}x "
            f"the pixels, {(img_size // MODELS[args.model].patch_size) ** 2} tokens an image (--img-size: another size)")
    model = T.build_model(args, data, ctx, img_size, args.global_pool)

    state, new, notes = adapt(state, model, args)
    n_loaded = sum(v.numel() for v in state.values())
    load_checked(model, {**model.state_dict(), **{k: v.to(ctx.device) for k, v in state.items()}}, args.weights)
    log(f"loaded {len(state)} tensors ({n_loaded / 1e6:.2f}M values) from {args.weights}" + (" (EMA)" if args.use_ema else ""))
    for n in notes:
        log(f"  {n}")
    redrawn = args.head_init_std is not None and not args.keep_head
    if redrawn:  # MAE's main_finetune.py: trunc_normal_(head.weight, std=2e-5)
        for head in [model.head] + ([model.head_dist] if model.cfg.distilled else []):
            torch.nn.init.trunc_normal_(head.weight, std=args.head_init_std)
            torch.nn.init.zeros_(head.bias)
    log(f"  newly initialised: {', '.join(new) if new else 'nothing'}"
        + (f" (heads: std {args.head_init_std:g})" if redrawn else ""))
    if args.freeze:  # linear probe: only the heads learn; the optimizer never sees the rest (model.param_groups)
        for k, p in model.named_parameters():
            p.requires_grad = k.startswith(("head.", "head_dist."))
        log(f"  frozen: everything but {', '.join(k for k, p in model.named_parameters() if p.requires_grad)}")

    teacher = T.build_teacher(args, data, img_size, log)
    return T.train(args, ctx, model, data, log, teacher, layer_decay=args.layer_decay)


if __name__ == "__main__":
    with cli():
        main()
