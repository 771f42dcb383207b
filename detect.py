"""
Swap the ResNet-50: torchvision's Faster R-CNN (or Mask R-CNN) with a DeiT backbone (model.Backbone: the
ViT's last map, ViTDet's simple feature pyramid), trained and evaluated by train.py's loop (DDP/torchrun,
checkpoints and exact resume, progress, log.jsonl, the out-dir lock, one-line errors).

    python detect.py                                  # deit_nano_patch4_28 from scratch, on garment scenes
    python detect.py --weights out/ckpt.pt            # its backbone from train.py's (or mae.py's) checkpoint
    python detect.py --model resnet50                 # torchvision's ResNet-50-FPN, the backbone being replaced
    python detect.py --masks                          # Mask R-CNN: boxes and instance masks

The data: scenes of Fashion-MNIST's garments (make_scenes; the test split's for evaluation), or a COCO-style folder
(--data DIR: train/ and val/, images and annotations.json; boxes only). The metric: COCO's box AP and AP50, and mask's.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment as A
import train as T
from checkpoint import write_atomic
from launch import cli, start
from data import (FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD, find_folder, load_idx_folder, object_sides,
                  val_batches)
from distill import create_convnet, ours
from model import (MODELS, Backbone, DeiT, DeiTConfig, check_file, create_model, fit_in_chans, load_checked,
                   read_file, release_model, state_dict_of)

RESNETS = ("resnet18", "resnet34", "resnet50")  # torchvision's, with its FPN (as resnet_fpn_backbone)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MIN_PIXELS = 16  # an object left with fewer visible pixels (hidden by later ones) is not annotated


# ----------------------------------------------------------------------------------------------------------
# Data, per split: uint8 images (N, C, S, S) and their indices; per image a (k, 4) box tensor (x0, y0, x1, y1), k labels
# (1..classes; 0: torchvision's background) and, for scenes, an (S, S) map of which object each pixel shows.

def make_scenes(images, labels, n, size, seed, objects=(2, 5), sides=(16, 48)):
    """n size x size canvases, each with objects[0]..objects[1] garments of images (uint8 (N, 1, 28, 28)), each resized
    to a side in sides and pasted at a random place over the ones before (its pixels brighter than 32 of 255).
    Deterministic from seed. Returns (canvases, ids, boxes, labels)."""
    rng = np.random.default_rng(seed)
    canvas = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    ids, boxes, classes = torch.zeros(n, size, size, dtype=torch.uint8), [], []
    for i in range(n):  # data preparation, once; not the training path
        k = int(rng.integers(objects[0], objects[1] + 1))
        picks, ss = rng.integers(0, len(images), k), rng.integers(sides[0], sides[1] + 1, k)
        for j, (pick, s) in enumerate(zip(picks.tolist(), ss.tolist())):
            y0, x0 = rng.integers(0, size - s + 1, 2).tolist()
            g = F.interpolate(images[pick][None].float(), size=(s, s), mode="bilinear", antialias=True)[0, 0].round()
            on = g > 32
            canvas[i, 0, y0:y0 + s, x0:x0 + s][on] = g[on].to(torch.uint8)
            ids[i, y0:y0 + s, x0:x0 + s][on] = j + 1
        bx, cl, kept = [], [], torch.zeros_like(ids[i])
        for j in range(k):
            ys, xs = (ids[i] == j + 1).nonzero(as_tuple=True)
            if len(ys) >= MIN_PIXELS:
                bx.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                cl.append(int(labels[picks[j]]) + 1)
                kept[ids[i] == j + 1] = len(bx)
        ids[i] = kept
        boxes.append(torch.tensor(bx, dtype=torch.float32).reshape(-1, 4))
        classes.append(torch.tensor(cl, dtype=torch.int64))
    return canvas, ids, boxes, classes


def load_coco_folder(root, split, size):
    """root/split/annotations.json (COCO's: bbox [x, y, w, h]) and images, scaled to size on the longer side, padded.
    Each problem is one line naming the file, the image and the annotation: an unknown image or category, a bbox
    not of 4 finite numbers with a positive size, or wholly outside its image. A box reaching outside is clipped (as
    COCO's tools do), counted in a warning. An unreadable image is refused, not skipped: objects are annotated there."""
    from PIL import Image
    path = os.path.join(root, split, "annotations.json")
    check_file(path, "annotations")
    try:
        coco = json.load(open(path))
        cats = sorted(c["id"] for c in coco["categories"])
        files = {im["id"]: os.path.join(root, split, im["file_name"]) for im in coco["images"]}
        anns = [(a.get("id"), a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not COCO-style annotations ({type(e).__name__}: {e})") from None
    per_image = {image_id: [] for image_id in files}
    for ann, image_id, cat, box in anns:
        where = f"{path}: annotation {ann} (image {image_id})"
        if image_id not in files or cat not in cats:
            raise ValueError(f"{where}: " + ("no such image among its images" if image_id not in files else
                                             f"category_id {cat} is not among its categories {cats}"))
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                for v in box) and box[2] > 0 and box[3] > 0):
            raise ValueError(f"{where}: bbox {box} is not [x, y, width, height] with a positive width and height")
        per_image[image_id].append((where, cats.index(cat) + 1, box))
    x, boxes, classes, clipped = torch.zeros(len(files), 3, size, size, dtype=torch.uint8), [], [], 0
    for i, (image_id, file) in enumerate(files.items()):
        check_file(file, "image")
        try:
            im = Image.open(file).convert("RGB")
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: image {image_id} ({file}) cannot be read ({type(e).__name__}: {e})") from None
        scale = size / max(im.size)
        w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        x[i, :, :h, :w] = torch.from_numpy(np.array(im.resize((w, h), Image.BICUBIC))).permute(2, 0, 1)
        inside = []
        for where, _, (x0, y0, bw, bh) in per_image[image_id]:
            inside.append([max(x0, 0), max(y0, 0), min(x0 + bw, im.width), min(y0 + bh, im.height)])
            if inside[-1][2] <= inside[-1][0] or inside[-1][3] <= inside[-1][1]:
                raise ValueError(f"{where}: bbox {[x0, y0, bw, bh]} lies outside its {im.width}x{im.height} image")
            clipped += inside[-1] != [x0, y0, x0 + bw, y0 + bh]
        boxes.append((torch.tensor(inside, dtype=torch.float64).reshape(-1, 4) * scale).float())
        classes.append(torch.tensor([c for _, c, _ in per_image[image_id]], dtype=torch.int64))
    if clipped:
        print(f"warning: {path}: {clipped} box(es) reach outside their image: clipped to it", flush=True)
    return x, None, boxes, classes, [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


def load_data(args, device):
    """train.py's data namespace, the splits on the device, data.annotations[split] (ids, boxes, labels) on the host."""
    try:
        lo, hi = (int(v) for v in args.objects.split("-"))
    except ValueError:
        raise ValueError(f"--objects {args.objects!r}: give a range such as 2-5") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--objects {args.objects!r}: the range must be 1 or more, the smaller first")
    folder = find_folder(args.data)
    if os.path.isfile(os.path.join(folder, "train", "annotations.json")):
        if args.masks:
            raise ValueError("--masks needs instance masks: the composed scenes have them, COCO folders here do not")
        splits = {s: load_coco_folder(folder, s, args.img_size) for s in ("train", "val")}
        names, mean, std = splits["train"][4], IMAGENET_MEAN, IMAGENET_STD
    else:
        (tx, ty), (vx, vy) = load_idx_folder(folder)
        sides = object_sides(args.img_size)
        n = args.scenes if args.train_subset is None else min(args.scenes, round(
            args.train_subset * args.scenes if args.train_subset < 1 else args.train_subset))  # (studies' QUICK=1)
        splits = {"train": make_scenes(tx, ty, max(1, n), args.img_size, args.seed, (lo, hi), sides),
                  "val": make_scenes(vx, vy, args.val_scenes, args.img_size, 1_000_003, (lo, hi), sides)}
        names, mean, std = CLASSES, FMNIST_MEAN, FMNIST_STD  # what train.py's backbones saw
    data = argparse.Namespace(num_classes=len(names) + 1, class_names=names, mean=mean, std=std, tensors=True,
                              skipped=[], annotations={}, in_chans=splits["train"][0].shape[1])
    for split, (x, ids, boxes, labels, *_) in splits.items():  # the training indices stay on the host (targets_of)
        setattr(data, split, (x.to(device), torch.arange(len(x), device=None if split == "train" else device)))
        data.annotations[split] = (ids, boxes, labels)
    data.targets = make_targets(*data.annotations["train"], args.masks, device)
    return data


def make_targets(ids, boxes, labels, masks, device):
    """torchvision's targets of every training image, on the device once (masks: uint8 (k, S, S), from ids)."""
    return [{"boxes": b.to(device), "labels": c.to(device),
             **({"masks": (ids[i] == torch.arange(1, len(b) + 1)[:, None, None]).to(torch.uint8).to(device)}
                if masks else {})} for i, (b, c) in enumerate(zip(boxes, labels))]


def targets_of(data, index, flip):
    """The targets of the training images index (host ints), mirrored where flip (host bools): picked, no wait."""
    out, W = [], data.train[0].shape[-1]
    for i, f in zip(index.tolist(), flip.tolist()):
        t = dict(data.targets[i])
        if f:
            t["boxes"] = t["boxes"].clone()
            t["boxes"][:, [0, 2]] = W - data.targets[i]["boxes"][:, [2, 0]]
            t.update({"masks": t["masks"].flip(-1)} if "masks" in t else {})
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------
# The detector

class Detector(nn.Module):
    """torchvision's FasterRCNN / MaskRCNN around a backbone, on train.py's batches (images in [0, 1])."""

    def __init__(self, backbone, num_classes, size, mean, std, masks=False, model="", freeze_trunk=False):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
        # Sized for small images on a CPU (torchvision's 800-px COCO defaults in brackets): anchors of size/12 to 16x
        # that (32-512 px), three shapes each; proposals kept per image: 300 in training (2000), 150 in evaluation
        # (1000); 128 sampled for the box head (512), 256 wide (1024); the mask head's convs as wide as the pyramid.
        base, C = max(4, size // 12), backbone.out_channels
        heads = dict(rpn_anchor_generator=AnchorGenerator(tuple((base * 2 ** i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5),
                     rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                     rpn_post_nms_top_n_test=150, box_batch_size_per_image=128, box_head=TwoMLPHead(C * 7 * 7, 256),
                     box_predictor=FastRCNNPredictor(256, num_classes))
        if masks:
            heads.update(mask_head=MaskRCNNHeads(C, (C,) * 4, 1), mask_predictor=MaskRCNNPredictor(C, C, num_classes))
        kind = MaskRCNN if masks else FasterRCNN
        self.det = kind(backbone, None, min_size=size, max_size=size, image_mean=list(mean), image_std=list(std), **heads)
        # for --eval-only to rebuild it: the ViT as trained (distilled or not, its position grid), the pyramid's width
        vit = dict(vars(backbone.vit.cfg)) if isinstance(backbone, Backbone) else None
        self.cfg = argparse.Namespace(model=model, num_classes=num_classes, masks=masks, vit=vit,
                                      fpn_channels=C, freeze_trunk=freeze_trunk)
        if freeze_trunk:  # only the pyramid (FPN) and the heads learn: do the pretrained features carry as they are?
            self.trunk().requires_grad_(False)

    def trunk(self):
        """The pretrained part of the backbone: the ViT, or the ResNet's body (its FPN is the pyramid)."""
        b = self.det.backbone
        return b.vit if isinstance(b, Backbone) else b.body

    def train(self, mode=True):
        super().train(mode)
        if self.cfg.freeze_trunk:  # a frozen trunk stays in eval mode: BatchNorm's statistics kept, no drop path
            self.trunk().eval()
        return self

    def forward(self, images, targets=None):
        """torchvision's GeneralizedRCNN.forward with only the backbone under the autocast in force: anchors, RPN, ROI
        heads, box decoding and NMS run in fp32 for every backbone. In bf16, batched NMS's class offsets (label x
        (max + 1): ~970 px for 96-px scenes) meet a 4-px spacing (256 px at 800 px), merging classes' boxes. Targets
        are checked when they load, so no step waits for that."""
        det, sizes, device = self.det, [tuple(x.shape[-2:]) for x in images], images.device.type
        with torch.autocast(device, enabled=False):
            images, targets = det.transform(list(images), targets)
        features = {k: v.float() for k, v in det.backbone(images.tensors).items()}
        with torch.autocast(device, enabled=False):
            proposals, rpn_losses = det.rpn(images, features, targets)
            detections, roi_losses = det.roi_heads(features, proposals, images.image_sizes, targets)
            return {**roi_losses, **rpn_losses} if self.training else \
                det.transform.postprocess(detections, images.image_sizes, sizes)

    @property
    def blocks(self):
        return getattr(self.det.backbone, "blocks", [])

    def layer_id(self, name):
        if name.startswith("det.backbone.") and isinstance(self.det.backbone, Backbone):
            return self.det.backbone.layer_id(name[len("det.backbone."):])
        return len(self.blocks) + 1

    def no_weight_decay(self):
        b = self.det.backbone
        return {"det.backbone." + n for n in b.no_weight_decay()} if isinstance(b, Backbone) else set()


def build_backbone(args, in_chans, log):
    """Ours (--model) or torchvision's ResNet-FPN, from --weights (any file its help names) or fresh."""
    if args.model in RESNETS:
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        # BatchNorm that trains (resnet_fpn_backbone freezes it, for ImageNet weights; from scratch it must learn)
        resnet = create_convnet(args.model, 1000, in_chans)
        if args.weights:
            state = state_dict_of(read_file(args.weights), args.weights)
            state = fit_in_chans({k: v for k, v in state.items() if not k.startswith("fc.")}, "conv1.weight",
                                 in_chans, args.weights)
            load_checked(resnet, {**state, "fc.weight": resnet.fc.weight, "fc.bias": resnet.fc.bias}, args.weights)
            log(f"backbone: {args.model} from {args.weights} (fc left out)")
        widths = [256, 512, 1024, 2048] if args.model == "resnet50" else [64, 128, 256, 512]
        return BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, widths, args.fpn_channels,
                               extra_blocks=LastLevelMaxPool())  # as resnet_fpn_backbone, our pyramid's width
    if args.weights:
        # built for the detector's images, as the scratch one (the file's position embeddings resized once, here),
        # and without a distillation token: every ViT backbone is the same network, only its start differs
        backbone = Backbone.from_file(args.weights, args.model, args.fpn_channels, drop_path_rate=args.drop_path,
                                      in_chans=in_chans, img_size=args.img_size, distilled=False)
        log(f"backbone: {backbone.vit.cfg.embed_dim}-wide ViT, patch {backbone.vit.cfg.patch_size}, from "
            f"{args.weights}; left out: {', '.join(backbone.left_out) or 'nothing'}")
        return backbone
    return Backbone(create_model(args.model, in_chans=in_chans, img_size=args.img_size, drop_path_rate=args.drop_path),
                    args.fpn_channels)


# ----------------------------------------------------------------------------------------------------------
# COCO's average precision

def box_iou(a, b):
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def mask_iou(a, b):
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter)


def average_precision(dets, gts, iou=box_iou, thresholds=np.arange(10) * 0.05 + 0.5):
    """COCO's AP (pycocotools' evaluate + accumulate, all areas, at most 100 detections per image), in %. dets: per
    image (scores, labels, items); gts: per image (labels, items); items: boxes (k, 4) or masks (k, H, W). Per class and
    IoU threshold t: detections in score order each take the unmatched ground truth they overlap most, if by t or more
    (a true positive), else count false; AP is the mean over recall 0, .01, ..., 1 of the best precision at that recall
    or more. Returns (AP averaged over the classes that have ground truth and over thresholds, AP per threshold)."""
    classes = sorted({int(c) for labels, _ in gts for c in labels})
    table = np.zeros((len(thresholds), len(classes)))
    for ci, c in enumerate(classes):
        scores, hits, n_gt = [], [], 0
        for (ds, dl, di), (gl, gi) in zip(dets, gts):
            keep = torch.argsort(ds, descending=True, stable=True)[:100]
            ds, dl, di = ds[keep], dl[keep], di[keep]
            d, g = dl == c, gl == c
            n_gt += int(g.sum())
            if not d.any():
                continue
            scores.append(ds[d])
            ious = iou(di[d], gi[g]) if g.any() else torch.zeros(int(d.sum()), 0)
            hit = torch.zeros(len(thresholds), int(d.sum()), dtype=torch.bool)
            for ti, t in enumerate(thresholds):
                taken = torch.zeros(ious.shape[1], dtype=torch.bool)
                for k in range(ious.shape[0]):  # detections in score order
                    cand = torch.where(taken, -1.0, ious[k])
                    if len(cand) and cand.max() >= min(t, 1 - 1e-10):
                        taken[int(cand.argmax())], hit[ti, k] = True, True
            hits.append(hit)
        if n_gt == 0 or not scores:
            continue
        hit = torch.cat(hits, 1)[:, torch.argsort(torch.cat(scores), descending=True, stable=True)]
        tp, fp = hit.double().cumsum(1), (~hit).double().cumsum(1)
        recall, precision = tp / n_gt, (tp / (tp + fp)).flip(1).cummax(1).values.flip(1)  # best at this recall or more
        for ti in range(len(thresholds)):
            at = torch.searchsorted(recall[ti].contiguous(), torch.linspace(0, 1, 101, dtype=torch.float64))
            p = torch.where(at < recall.shape[1], precision[ti][at.clamp(max=recall.shape[1] - 1)], 0.0)
            table[ti, ci] = p.mean().item()
    if not classes:
        return 0.0, [0.0] * len(thresholds)
    return 100 * table.mean(), (100 * table.mean(1)).tolist()


@torch.no_grad()
def evaluate(model, data, ctx, batch_size=16):
    """Box AP (and mask AP) on the held-out split: each process detects in its shard and sends the detections (masks
    as booleans, thresholded at 0.5 where made) to process 0, which computes AP; every process returns its result."""
    model.eval()
    found = []
    for x, idx in val_batches(data, batch_size, ctx.device, ctx.rank, ctx.world):
        with ctx.autocast:
            out = model(x.float() / 255)
        found += [(i, {k: (v[:, 0] > 0.5 if k == "masks" else v.float()).cpu() for k, v in o.items()})
                  for i, o in zip(idx.tolist(), out)]
    model.train()
    if ctx.ddp:
        everyone = [None] * ctx.world if ctx.master else None
        torch.distributed.gather_object(found, everyone, dst=0)
        found = [f for part in everyone for f in part] if ctx.master else []
    metrics = [None]
    if ctx.master:
        found.sort(key=lambda f: f[0])
        ids, boxes, labels = data.annotations["val"]
        ap, per_t = average_precision([(o["scores"], o["labels"], o["boxes"]) for _, o in found],
                                      [(labels[i], boxes[i]) for i, _ in found])
        metrics = [{"map": ap, "ap50": per_t[0], "ap75": per_t[5]}]
        if model.cfg.masks:
            dets = [(o["scores"], o["labels"], o["masks"]) for _, o in found]
            gts = [(labels[i], ids[i] == torch.arange(1, len(labels[i]) + 1)[:, None, None]) for i, _ in found]
            metrics[0]["mask_map"], per_t = average_precision(dets, gts, mask_iou)
            metrics[0]["mask_ap50"] = per_t[0]
    if ctx.ddp:
        torch.distributed.broadcast_object_list(metrics, src=0)
    return metrics[0]


@torch.no_grad()
def save_picture(model, data, path, n=8, min_score=0.3):
    """n held-out scenes with the detections scoring min_score or more: box, class name and score (0.3, not the usual
    0.5: a detector trained for minutes spreads its scores over the classes, and at 0.5 shows next to no boxes)."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, make_grid
    x = data.val[0][:n]
    model.eval()
    out = model(x.float() / 255)
    model.train()
    tiles = []
    for im, o in zip(x.cpu(), out):
        keep = o["scores"].cpu() >= min_score
        names = [f"{data.class_names[int(c) - 1]} {s:.2f}" for c, s in zip(o["labels"].cpu()[keep], o["scores"].cpu()[keep])]
        im = im.expand(3, -1, -1) if im.shape[0] == 1 else im
        im = F.interpolate(im[None].float(), scale_factor=2, mode="nearest")[0].to(torch.uint8)  # room for the names
        tiles.append(draw_bounding_boxes(im, o["boxes"].cpu()[keep] * 2, names, colors="red") if keep.any() else im)
    grid = make_grid(tiles, nrow=4, padding=2).permute(1, 2, 0).numpy()
    write_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp, format="png"), "no picture written")


def detection_task(args, data):
    """What train.train asks of a task: the batches' flips, the loss, the evaluation, the picture."""

    def augment(x, index, rng, gen):  # torchvision's detection recipe: a horizontal flip, per image, drawn on the host
        flip = rng.random(len(index)) < args.hflip
        on = A.to_device(x.device, flip)[0] > 0.5  # a copy that does not wait
        return torch.where(on[:, None, None, None], x.flip(-1), x).float() / 255, (index, flip)

    def loss(run, x, targets, gen):
        return sum(run.net(x, targets_of(data, *targets)).values())

    def next_steps(args):
        return [f"picture: {os.path.join(args.out_dir, 'detections.png')}",
                f"train on: python detect.py --resume --epochs {2 * args.epochs} --out-dir {args.out_dir}"]

    picture = os.path.join(args.out_dir, "detections.png")
    return T.Task(loss, lambda run, data, ctx, batch_size: evaluate(run.model, data, ctx), next_steps, key="map",
                  augment=augment, after_epoch=lambda run, data, epoch: save_picture(run.model, data, picture))


def get_parser():
    p = T.get_parser()
    p.prog = "detect.py"
    p.description = ("Train and evaluate a torchvision Faster R-CNN / Mask R-CNN with a DeiT backbone (or a ResNet). "
                     "train.py's optimisation, running and data flags work here; of its augmentation, only --hflip.")
    a = p.add_argument
    a("--weights", default=None, help="the backbone's: what model.Backbone.from_file reads (a DeiT release by name or "
      "file, the ckpt.pt of train.py, finetune.py or mae.py) or, with --model resnet*, torchvision's; default: from "
      "scratch")
    a("--masks", action="store_true", help="Mask R-CNN: instance masks too (composed scenes only)")
    a("--scenes", type=int, default=2000, help="training scenes composed from the training split's garments")
    a("--val-scenes", type=int, default=500, help="held-out scenes, from the test split's garments")
    a("--objects", default="2-5", help="garments per scene, a range")
    a("--freeze-trunk", action="store_true", help="train only the pyramid and the heads: the backbone's trunk (the "
      "ViT, or the ResNet's body) keeps its --weights, in eval mode")
    a("--fpn-channels", type=int, default=64, help="the pyramid's width (torchvision's and ViTDet's: 256)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay of a ViT backbone (ViTDet: 0.7 for "
      "ViT-B over 184k steps); 1: none, every backbone trained alike")
    # lr: ViTDet's (8e-4 per 512) is for 184k steps, and leaves a CPU run's few hundred near zero: 60x it is what
    # RESULTS.md "Detection" trains at (studies/detection.sh's probes)
    p.set_defaults(script=p.prog, model="deit_nano_patch4_28", img_size=96, epochs=12, batch_size=16, lr=4.8e-2,
                   min_lr=1e-6, weight_decay=0.1, warmup_epochs=1, drop_path=0.1, model_ema=False, compile=False,
                   aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=False)
    # img_size: a scene's garments are 8 px or more (data.object_sides), and the anchors 4 px or more
    p.ranges.update(scenes="[1, inf)", val_scenes="[1, inf)", fpn_channels="[1, inf)", layer_decay="(0, 1]",
                    img_size="[16, inf)")
    return p


def release(args):  # --weights NAME: the release's architecture, unless --model says otherwise
    model = release_model(args.weights)
    return {"model": model} if model else {}


def main(argv=None):
    args, ctx, log = start(get_parser(), argv, release)
    if args.model not in MODELS and args.model not in RESNETS:
        raise ValueError(f"--model {args.model}: one of ours ({', '.join(m for m in MODELS if 'distilled' not in m)}, "
                         f"...) or torchvision's {', '.join(RESNETS)}")
    if args.distill != "none":
        raise ValueError("detect.py trains a detector without a teacher: drop --distill")
    patch = MODELS[args.model].patch_size if args.model in MODELS else 4
    if patch & (patch - 1):
        raise ValueError(f"the pyramid needs a power-of-2 patch size, and {args.model} has {patch}: choose 4 or 16")
    data = load_data(args, ctx.device)
    if args.eval_only:
        path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
        ckpt = read_file(path, "checkpoint")
        if not ours(ckpt) or "masks" not in ckpt["model_config"]:
            raise ValueError(f"{path} is not a detect.py checkpoint")
        args.weights, args.fpn_channels = None, ckpt["model_config"].get("fpn_channels", args.fpn_channels)
    vit = ckpt["model_config"].get("vit") if args.eval_only else None  # the ViT as trained (None: a ResNet)
    backbone = Backbone(DeiT(DeiTConfig(**vit)), args.fpn_channels) if vit else build_backbone(args, data.in_chans, log)
    if args.freeze_trunk and not args.weights and not args.eval_only:
        raise ValueError("--freeze-trunk keeps the trunk's weights as they are: give them with --weights")
    model = Detector(backbone, data.num_classes, args.img_size, data.mean, data.std, args.masks, args.model,
                     args.freeze_trunk and not args.eval_only).to(ctx.device)
    if ctx.ddp and ctx.device.type == "cuda":  # BatchNorm over the global batch, as torchvision's detection
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # references: a few images a GPU is too few
    if args.eval_only:
        load_checked(model, ckpt["model"], path)
        metrics = evaluate(model, data, ctx)
        log(" | ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics
    return T.train(args, ctx, model, data, log, task=detection_task(args, data),
                   layer_decay=args.layer_decay if isinstance(backbone, Backbone) else 1.0)


if __name__ == "__main__":
    with cli():
        main()
