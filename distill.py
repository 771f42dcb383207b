"""
Distillation through attention (Touvron et al. 2021, §4): a convnet teacher trains the distillation token.

A distilled DeiT's class token head learns from the labels, its distillation token's from the teacher; DistillationLoss:

    loss = (1 - alpha) * base(class_logits, targets) + alpha * distill(dist_logits, teacher_logits)

    soft:  KL(softmax(teacher / tau) || softmax(dist / tau)) * tau^2, summed and divided by B*C (see below)
    hard:  cross_entropy(dist_logits, argmax(teacher_logits)), no label smoothing (paper §4, Eq. 3)

Paper Table 3: hard beats soft, and the student (class + dist heads) can beat its teacher. The teacher sees the
same mixed, augmented batch as the student, as in the reference (facebookresearch/deit losses.py and main.py).
DeiT's teacher is RegNetY-16GF: `regnety_160` is DeiT's own released file (timm's key names, mapped here onto
torchvision's `regnet_y_16gf`, the same network), `regnet_y_16gf` torchvision's weights; load_teacher lists the rest.
Needs torch and model.py (DeiT teachers, weights files); torchvision for torchvision's teachers only.
"""

import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (MODELS, RELEASES, DeiT, DeiTConfig, check_file, create_model, load_checked, read_file,
                   state_dict_of)


def base_loss(logits, targets, smoothing=0.1):
    """The loss on the labels: cross-entropy with the soft targets of Mixup/CutMix (smoothing already folded in),
    or with label smoothing, (1-s)*nll + s*mean_c(-log p), when nothing is mixed (paper Table 9: smoothing 0.1)."""
    logits = logits.float()
    if targets.ndim == 2:
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


class DistillationLoss(nn.Module):
    """kind none | soft | hard, as DistillationLoss in facebookresearch/deit losses.py: with "none" only the class
    head is trained and head_dist gets no gradient, as in the reference. kind "labels" (not in the reference): no
    teacher, the dist token learns the labels as the class token does: the paper's control of §4, a second class
    token, which it reports ends up the same as the first (cosine 0.999)."""

    def __init__(self, base_criterion=base_loss, teacher=None, kind="none", alpha=0.5, tau=1.0):
        super().__init__()
        if kind not in ("none", "soft", "hard", "labels"):
            raise ValueError(f"distillation kind must be none, soft, hard or labels, not {kind!r}")
        if kind in ("soft", "hard") and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base_criterion, teacher, kind, alpha, tau

    def forward(self, inputs, outputs, targets):
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        base = self.base(cls_logits, targets)
        if self.kind == "none":
            return base
        if dist_logits is None:
            raise ValueError("distillation needs a model with a distillation token (a *_distilled_* variant)")
        if self.kind == "labels":
            return (1 - self.alpha) * base + self.alpha * self.base(dist_logits, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()
        dist_logits = dist_logits.float()
        if self.kind == "soft":
            T = self.tau
            # The reference divides the summed KL by B*C (1/C of "batchmean"), kept so that alpha and tau mean what they
            # mean there (its maintainers find batchmean similar or slightly worse); times tau^2 as in Hinton et al.
            distill = F.kl_div(F.log_softmax(dist_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                               reduction="sum", log_target=True) * (T * T) / dist_logits.numel()
        else:  # hard: the teacher's decision is a label, taken as it is (no smoothing)
            distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        return (1 - self.alpha) * base + self.alpha * distill


# ----------------------------------------------------------------------------------------------------------
# A small convnet teacher for 28-64 px images. ImageNet convnets' stride-4 stem (or more) leaves a 28-px image a 7x7 map
# before any real work: fine for a backbone, weak for a teacher. This VGG-style one keeps full resolution for its first
# stage and halves it twice, 28 -> 14 -> 7: the convolutional inductive bias the paper's teacher hands on (§5.2).

# --model NAME -> widths of the three stages; torchvision's ResNets too, so train.py pretrains detect.py's backbones
CONVNETS = {"convnet": (32, 64, 128), "resnet18": "torchvision", "resnet34": "torchvision", "resnet50": "torchvision"}


@dataclass
class ConvNetConfig:
    num_classes: int = 10
    in_chans: int = 3
    widths: tuple = field(default_factory=lambda: CONVNETS["convnet"])


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        layers, c = [], cfg.in_chans
        for i, w in enumerate(cfg.widths):
            layers += ([nn.MaxPool2d(2)] if i else []) + [conv_bn(c, w), conv_bn(w, w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, cfg.num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def create_convnet(name, num_classes, in_chans):
    if CONVNETS[name] != "torchvision":
        return ConvNet(ConvNetConfig(num_classes=num_classes, in_chans=in_chans, widths=tuple(CONVNETS[name])))
    import torchvision
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


# ----------------------------------------------------------------------------------------------------------
# Teachers

def ours(ckpt):
    """Whether read_file's result is a checkpoint of train.py (finetune.py, mae.py): weights, flags, model config."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model_config"), dict)


def rebuild(ckpt, **overrides):
    """The model of one of our checkpoints, weights not loaded; overrides that are not None replace config fields."""
    cfg = {**ckpt["model_config"], **{k: v for k, v in overrides.items() if v is not None}}
    name = ckpt["config"]["model"]
    return create_convnet(name, cfg["num_classes"], cfg["in_chans"]) if name in CONVNETS else DeiT(DeiTConfig(**cfg))


def inference_form(teacher):
    """The frozen teacher as training runs it: each BatchNorm folded into the convolution before it (in eval mode a
    BatchNorm is a fixed affine map, so the logits equal the unfolded net's to float rounding; torch.fx finds the
    pairs) and channels-last weights, the layout oneDNN's and cuDNN's convolutions are fastest in. On the CPU the
    default convnet teacher then runs ~1.8x as fast, RegNetY ~1.6x (a forward on every training batch)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
        return teacher  # a DeiT teacher: nothing to fold
    from torch.fx.experimental.optimization import fuse
    return fuse(teacher).to(memory_format=torch.channels_last)


def _num_classes(state):
    """The classifier's rows: DeiT's head or a ResNet's or RegNet's fc, else the last 2-D weight in the file's order
    (every torchvision state dict's classifier; a .safetensors file keeps its keys sorted, not in that order)."""
    if "head.weight" in state or "fc.weight" in state:
        return state.get("head.weight", state.get("fc.weight")).shape[0]
    return next((v.shape[0] for v in reversed(state.values()) if v.ndim == 2), 1000)


def _torchvision(name, weights):
    import torchvision
    if weights is not None:  # a local file, with as many classes as its classifier has rows
        state = state_dict_of(read_file(weights, "teacher weights"), weights)
        model = torchvision.models.get_model(name, weights=None, num_classes=_num_classes(state))
        load_checked(model, state, f"teacher weights {weights}")
        return model
    try:  # torchvision's ImageNet weights, downloaded once into torch.hub's cache (TORCH_HOME)
        return torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as e:
        raise ValueError(f"could not get torchvision's weights for teacher {name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); offline? Download them once online, or pass "
                         "--teacher-weights FILE") from None


# DeiT's teacher as released (facebookresearch/deit main.py loads regnety_160-a5fe301d.pth into timm's regnety_160): the
# same network as torchvision's regnet_y_16gf (widths, groups of 112, SE on a quarter of the block's input, BN eps
# 1e-5), every timm key mapped to torchvision's below. Any key either side that the map leaves unmatched refuses
# the file (load_checked) rather than load it loosely; test_all.py checks the logits against timm's own model.
TIMM_TEACHERS = {"regnety_160": "regnet_y_16gf"}
TIMM_PARTS = {"conv1.conv": "f.a.0", "conv1.bn": "f.a.1", "conv2.conv": "f.b.0", "conv2.bn": "f.b.1", "se.fc1": "f.se.fc1",
              "se.fc2": "f.se.fc2", "conv3.conv": "f.c.0", "conv3.bn": "f.c.1", "downsample.conv": "proj.0",
              "downsample.bn": "proj.1", "stem.conv": "stem.0", "stem.bn": "stem.1", "head.fc": "fc"}


def timm_regnet_key(key):
    """timm's RegNet key -> torchvision's: s2.b3.conv1.conv.weight -> trunk_output.block2.block2-2.f.a.0.weight."""
    m = re.fullmatch(r"s(\d+)\.b(\d+)\.(\w+\.\w+)\.(\w+)", key)
    if m:
        s, b, part, leaf = m.groups()
        return f"trunk_output.block{s}.block{s}-{int(b) - 1}.{TIMM_PARTS.get(part, part)}.{leaf}"
    m = re.fullmatch(r"(\w+\.\w+)\.(\w+)", key)
    return f"{TIMM_PARTS.get(m.group(1), m.group(1))}.{m.group(2)}" if m else key


def is_file_name(name):
    return os.path.isfile(name) or os.sep in name or name.endswith((".pt", ".pth"))


def default_teacher(name, data, bundled):
    """name (--teacher) if given, else DeiT's own regnety_160, but the bundled data ships its own (bundled: its path)."""
    if name is not None:
        return name
    if data != "bundled":
        return "regnety_160"
    if not os.path.isfile(bundled):
        raise ValueError(f"the bundled data's teacher {bundled} is missing: make it with "
                         "python prepare_data.py --teacher (85 s on a 2-core CPU)")
    return bundled


def check_teacher(name, weights=None):
    """What load_teacher would refuse in its arguments, found without loading anything (train.py: before the data).
    Returns the weights to load: weights, or for a release's name (a DeiT, regnety_160) its own."""
    weights = weights or (name if name in RELEASES else None)
    if is_file_name(name):
        check_file(name, "teacher checkpoint")
    elif name in TIMM_TEACHERS:
        check_file(weights, "--teacher-weights")
    elif name in MODELS or CONVNETS.get(name, "torchvision") != "torchvision":  # ours (resnet18 here: torchvision's)
        if weights is None:
            raise ValueError(f"teacher {name} needs trained weights: train it with train.py --model {name} and "
                             "pass its ckpt.pt as --teacher (or a weights file as --teacher-weights)")
    else:
        import torchvision
        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise ValueError(f"unknown teacher {name!r}: give a train.py checkpoint, 'convnet', or a torchvision "
                             f"classification model ({', '.join(n for n in names if n.startswith('regnet_y'))}, ...)")
    return weights


def load_teacher(name, weights=None, num_classes=None, in_chans=None, img_size=None):
    """A teacher, in eval mode with requires_grad off, from a checkpoint of train.py (its model rebuilt from its
    config), from "convnet" or a DeiT name of model.py with weights=FILE (theirs, ours or the official format), or from
    a torchvision classification model's name (torchvision's ImageNet weights, or weights=FILE), or regnety_160
    (DeiT's released teacher, or weights=FILE in its format). With num_classes,
    in_chans and img_size, a dry run makes a mismatch with the data one clear error up front."""
    weights = check_teacher(name, weights)
    if is_file_name(name):
        ckpt = read_file(name, "teacher checkpoint")
        if not ours(ckpt):
            raise ValueError(f"teacher checkpoint {name} was not written by train.py: give the architecture "
                             "as --teacher NAME and this file as --teacher-weights")
        teacher = rebuild(ckpt)
        load_checked(teacher, ckpt["model"], f"teacher checkpoint {name}")
    elif name in MODELS or CONVNETS.get(name, "torchvision") != "torchvision":  # ours (resnet18 here: torchvision's)
        state = state_dict_of(read_file(weights, "teacher weights"), weights)
        classes = _num_classes(state)
        chans = next((v.shape[1] for v in state.values() if v.ndim == 4), 3)
        teacher = (create_convnet(name, classes, chans) if name in CONVNETS
                   else create_model(name, num_classes=classes, in_chans=chans))
        load_checked(teacher, state, f"teacher weights {weights}")
    elif name in TIMM_TEACHERS:  # DeiT's file (downloaded by name, or --teacher-weights), its keys made torchvision's
        import torchvision
        state = {timm_regnet_key(k): v for k, v in state_dict_of(read_file(weights), weights).items()}
        teacher = torchvision.models.get_model(TIMM_TEACHERS[name], weights=None, num_classes=_num_classes(state))
        load_checked(teacher, state, f"teacher {name} ({weights}, keys mapped from timm's)")
    else:
        teacher = _torchvision(name, weights)
    teacher.eval().requires_grad_(False)
    if num_classes is not None:
        try:
            with torch.no_grad():
                out = teacher(torch.zeros(2, in_chans, img_size, img_size))
        except Exception as e:
            raise ValueError(f"teacher {name} cannot take {in_chans}-channel {img_size}-px images: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        if out.shape[-1] != num_classes:
            raise ValueError(f"teacher {name} predicts {out.shape[-1]} classes, the data has {num_classes}: "
                             "train or fine-tune a teacher on this dataset")
    return teacher
