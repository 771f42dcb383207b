"""
MAE: masked-autoencoder pretraining of model.py's ViT (He et al. 2021, "Masked Autoencoders Are Scalable
Vision Learners", arXiv 2111.06377; reference code: facebookresearch/mae, models_mae.py and main_pretrain.py).

Classification pretraining teaches a backbone what the images of a class share; MAE, what each image has of its own.
Each image loses a random 75% of its patches; the encoder sees the rest and the class token; a light decoder gets the
encoded patches back in place, a shared learned mask token at each hidden one, and predicts the hidden pixels. Loss:
mean squared error on the hidden patches, against pixels normalised per patch (norm_pix_loss, MAE §4: sharper).

    python mae.py                                   # the bundled data, CPU-sized defaults
    torchrun --nproc_per_node=8 mae.py --data /imagenet --model deit_base_patch16_224 --epochs 800 \\
        --batch-size 4096 --decoder-dim 512 --decoder-depth 8 --decoder-heads 16 --warmup-epochs 40 --resume auto
    python finetune.py --weights out-mae/ckpt.pt   # the encoder, with MAE's fine-tune recipe

It runs on train.py's loop (DDP, compile and bf16 on CUDA, checkpoints, exact --resume, the JSON log, the nan stop);
only the task differs (reconstruction_task). Each evaluated epoch adds out_dir/reconstructions/epoch_NNN.png.
"""

import argparse
import os
import sys

import torch
import torch.nn as nn

import augment as A
import train as T
from checkpoint import write_atomic
from data import val_batches
from distill import CONVNETS
from launch import all_sum, check_model, cli, start
from model import Block, DeiTConfig, load_checked, read_file, state_dict_of

# MAE's recipe (main_pretrain.py, the paper's Table 8), with MAE's value where ours differs; demo-sized where
# marked, so that `python mae.py` runs in minutes on a CPU. The batch stays train.py's 128 (MAE: 4096).
MAE_DEFAULTS = dict(
    lr=1.5e-3,  # per 512 images; MAE: 1.5e-4 per 256 (3e-4 per 512): 5x, set once for a short run of a small model
    beta2=0.95, weight_decay=0.05, min_lr=0.0, sched="mae",  # AdamW (0.9, 0.95); warm-up from 0, then a half-cosine
    warmup_epochs=4,  # demo: a tenth of the demo's 36 epochs, as MAE's 40 of 400 (MAE: 40, of 800-1600 epochs)
    rrc_scale=0.2, hflip=0.5,  # RandomResizedCrop(scale 0.2-1) and flips: MAE's only augmentation
    aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0, model_ema=False, out_dir="out-mae")


def sincos_2d(dim, grid, cls_token=True):
    """MAE's fixed 2-D sine-cosine position embeddings (models_mae.py, util/pos_embed.py): half the channels encode
    the column ("emb_h" in MAE's code: numpy's meshgrid order), half the row; an all-zero row for the class token."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (cols, rows) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1).float()  # (grid * grid, dim), patches in row-major order
    return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb


def random_masking(x, ratio, noise):
    """Per image, keep the (1 - ratio) share of x's tokens (B, N, D) with the smallest noise (B, N), MAE's "shuffle by
    sorting random noise". Returns them (B, keep, D) in noise order, mask (B, N; 1: hidden) unshuffled, ids_restore."""
    B, N, D = x.shape
    keep = int(N * (1 - ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MAE(nn.Module):
    """model.py's ViT under DeiT's key names (finetune.py loads it) and MAE's decoder (decoder_*, mask_token)."""

    def __init__(self, encoder, decoder_dim=64, decoder_depth=2, decoder_heads=4, mask_ratio=0.75, norm_pix_loss=True):
        super().__init__()
        cfg = encoder.cfg
        if cfg.distilled:
            raise ValueError("MAE pretrains a plain ViT: choose a model without _distilled_")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be at least 0 and below 1 (MAE: 0.75), not {mask_ratio}")
        self.cfg, self.mask_ratio, self.norm_pix_loss = cfg, mask_ratio, norm_pix_loss
        self.grid = cfg.img_size // cfg.patch_size
        if int(self.grid ** 2 * (1 - mask_ratio)) < 1:
            raise ValueError(f"--mask-ratio {mask_ratio} hides every one of the {self.grid ** 2} patches")
        self.cls_token, self.pos_embed, self.patch_embed = encoder.cls_token, encoder.pos_embed, encoder.patch_embed
        self.blocks, self.norm = encoder.blocks, encoder.norm
        self.pos_embed.data.copy_(sincos_2d(cfg.embed_dim, self.grid)[None])  # fixed here; fine-tuning trains them
        self.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(cfg.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_dim, self.grid)[None], requires_grad=False)
        dcfg = DeiTConfig(embed_dim=decoder_dim, num_heads=decoder_heads, mlp_ratio=cfg.mlp_ratio)
        self.decoder_blocks = nn.ModuleList([Block(dcfg, 0.0) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch_size ** 2 * cfg.in_chans)
        # MAE's init (models_mae.py initialize_weights), the encoder's too (not DeiT's truncated normal 0.02); as there,
        # the patch embedding's bias keeps PyTorch's default, the LayerNorms their 1 and 0
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.data.view(cfg.embed_dim, -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):  # as model.py's DeiT (MAE's code decays cls_token and mask_token)
        return {"pos_embed", "cls_token"}

    def patchify(self, images):
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, each as (row, column, channel)."""
        B, C, H, W = images.shape
        p, g = self.cfg.patch_size, self.grid
        return images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)

    def unpatchify(self, patches):
        B, p, g, C = patches.shape[0], self.cfg.patch_size, self.grid, self.cfg.in_chans
        return patches.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def targets(self, images):
        """Each patch's target pixels, with norm_pix_loss normalised by its own mean and variance (MAE: var + 1e-6)."""
        t = self.patchify(images)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def forward(self, images, noise):
        """Returns (loss, predictions (B, N, p*p*C), mask (B, N), 1 = hidden)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        B, kept, Dd = x.shape
        hidden = self.mask_token.expand(B, ids_restore.shape[1] + 1 - kept, -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, Dd))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:].float()
        per_patch = ((pred - self.targets(images.float())) ** 2).mean(-1)
        weight = mask if self.mask_ratio > 0 else torch.ones_like(mask)  # nothing hidden: every patch counts
        return (per_patch * weight).sum() / weight.sum(), pred, mask


def noise_for(images, grid, gen):
    return torch.rand(images.shape[0], grid * grid, device=images.device, generator=gen)


def reconstruction_task(args, model):
    """The MAE task for train.train: the loss of a step (its masks from the step's device generator, so a
    resumed run repeats them), the held-out loss with masks fixed per batch, and the picture."""
    def loss(run, x, targets, gen):  # the loss lives in the model's forward, as in MAE
        return run.net(x, noise_for(x, model.grid, gen))[0]

    @torch.no_grad()
    def evaluate(run, data, ctx, batch_size):
        run.net.eval()
        total, n = torch.zeros((), dtype=torch.float64, device=ctx.device), 0
        gen = torch.Generator(ctx.device)
        for i, (x, _) in enumerate(val_batches(data, batch_size, ctx.device, ctx.rank, ctx.world)):
            gen.manual_seed(1_000_003 * i + ctx.rank)
            x = A.normalize(x, data.mean, data.std)
            with ctx.autocast:
                total += model(x, noise_for(x, model.grid, gen))[0].double() * len(x)
            n += len(x)
        run.net.train()
        loss, count = all_sum([total.item(), n], ctx)
        return {"val_loss": loss / max(count, 1)}

    def after_epoch(run, data, epoch):
        save_picture(model, data, os.path.join(args.out_dir, "reconstructions", f"epoch_{epoch + 1:03d}.png"), run)

    def next_steps(args):  # commands that work as printed (test_next_steps_work_as_printed)
        data = "" if args.data == "bundled" else f" --data {args.data}"
        return [f"pictures: {os.path.join(args.out_dir, 'reconstructions')}"] + ([] if args.probe else [
                f"fine-tune (MAE's recipe): python finetune.py --weights {os.path.join(args.out_dir, 'ckpt.pt')}{data} "
                f"--out-dir {args.out_dir}-finetune"]) + [
                f"train on: python mae.py --resume --epochs {2 * args.epochs} --out-dir {args.out_dir}"]

    return T.Task(loss, evaluate, next_steps, key="val_loss", lower_is_better=True, after_epoch=after_epoch)


@torch.no_grad()
def save_picture(model, data, path, run=None, n=8):
    """Rows: n held-out images, the same with their hidden patches grey, the reconstruction with the visible
    patches pasted back (as in MAE's figures); the same images and masks every epoch."""
    import torchvision.utils
    x, _ = next(val_batches(data, n, next(model.parameters()).device))
    x = A.normalize(x[:n], data.mean, data.std)
    gen = torch.Generator(x.device).manual_seed(0)
    was_training = model.training
    model.eval()
    _, pred, mask = model(x, noise_for(x, model.grid, gen))
    model.train(was_training)
    patches, m = model.patchify(x.float()), mask[..., None]
    if model.norm_pix_loss:  # back to pixels with each patch's own statistics, as MAE's visualisation
        pred = pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    visible = patches * (1 - m)
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (data.mean, data.std))
    grid = torch.cat([x, model.unpatchify(visible), model.unpatchify(visible + pred * m)]) * std + mean
    if grid.shape[-1] < 96:  # small images, enlarged with visible pixels
        grid = torch.nn.functional.interpolate(grid.float(), scale_factor=-(-96 // grid.shape[-1]), mode="nearest")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    write_atomic(path, lambda tmp: torchvision.utils.save_image(grid.clamp(0, 1).cpu(), tmp, format="png",
                                                                  nrow=len(x), padding=1), "no picture written")


def freeze_encoder(model, path, log):
    """The probe's encoder: path's weights under DeiT's names (its position embeddings, learned or sine-cosine),
    frozen; what a backbone keeps of each image's detail is then what a decoder can read back from its patch tokens."""
    state = state_dict_of(read_file(path, "weights"), path)
    own = model.state_dict()
    encoder = [k for k in own if not k.startswith(("decoder_", "mask_token"))]
    missing = [k for k in encoder if k not in state]
    if missing:
        raise ValueError(f"{path} lacks the encoder's {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    load_checked(model, {**own, **{k: state[k].to(own[k].device) for k in encoder}}, path)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("decoder_", "mask_token")) and name != "decoder_pos_embed")
    log(f"probe: encoder from {path}, frozen ({len(encoder)} tensors); the decoder learns to reconstruct")


def get_parser():
    p = T.get_parser()
    p.prog = "mae.py"
    p.description = "MAE pretraining of a ViT (every train.py flag works here too; MAE's recipe as defaults)."
    a = p.add_argument
    a("--mask-ratio", type=float, default=0.75, help="share of the patches hidden from the encoder (MAE: 0.75)")
    a("--decoder-dim", type=int, default=64, help="decoder width (MAE: 512; a small decoder for 28-64 px)")
    a("--decoder-depth", type=int, default=2, help="decoder blocks (MAE: 8)")
    a("--decoder-heads", type=int, default=4, help="decoder attention heads (MAE: 16)")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
      help="targets normalised per patch (MAE §4); default: on, off with --probe")
    a("--probe", default=None, metavar="WEIGHTS", help="reconstruction probe instead of pretraining: the encoder "
      "from WEIGHTS (mae.py's, train.py's or any ViT state dict), frozen, sees every patch, and a fresh decoder "
      "learns to give back the pixels from its patch tokens; val loss = the pixel error (--mask-ratio 0 implied)")
    p.set_defaults(**MAE_DEFAULTS, script=p.prog)
    p.ranges.update(mask_ratio="[0, 1)", decoder_dim="[1, inf)", decoder_depth="[0, inf)", decoder_heads="[1, inf)")
    return p


def main(argv=None):
    argv, parser = sys.argv[1:] if argv is None else list(argv), get_parser()
    if any(a.split("=")[0] == "--probe" for a in argv):  # a probe is a run of its own, beside the one it probes
        parser.set_defaults(out_dir="out-mae-probe")
    args, ctx, log = start(parser, argv)
    if args.distill != "none":
        raise ValueError("mae.py pretrains without labels or a teacher: drop --distill")
    img_size = check_model(args, T.DEFAULT_MODEL, ctx, kept=1 - args.mask_ratio)  # the encoder sees the unmasked share
    if args.model in CONVNETS:
        raise ValueError(f"mae.py pretrains a ViT, not {args.model}")
    args.mask_ratio = 0.0 if args.probe else args.mask_ratio
    args.norm_pix_loss = not args.probe if args.norm_pix_loss is None else args.norm_pix_loss
    data = T.load(args, ctx.device, img_size)
    model = MAE(T.build_model(args, data, ctx, img_size), args.decoder_dim, args.decoder_depth, args.decoder_heads,
                args.mask_ratio, args.norm_pix_loss).to(ctx.device)
    if args.probe:
        freeze_encoder(model, args.probe, log)
    log(f"MAE: encoder {args.model}, decoder {args.decoder_depth} x {args.decoder_dim} wide, "
        f"{args.mask_ratio:.0%} of {model.grid ** 2} patches hidden, norm_pix_loss {args.norm_pix_loss}")
    return T.train(args, ctx, model, data, log, task=reconstruction_task(args, model))


if __name__ == "__main__":
    with cli():
        main()
