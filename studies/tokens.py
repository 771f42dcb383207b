"""What the distillation token learns (paper §5, "Distillation token"): python studies/tokens.py OUT, after
studies/tokens.sh has trained, in OUT, a hard-distilled student (hard/), the same student whose dist token
learns the labels instead (labels/: the paper's second class token) and their convnet teacher (teacher/).

Prints the mean cosine, over the 10,000 Fashion-MNIST test images, between the class token and the
distillation token as learned (the embeddings themselves) and after each block; writes OUT/token-cosine.png
(that table as lines) and OUT/token-attention.png (tokens.sh copies both to assets/): for 8 test images, where the class token and the
distillation token look in the last block (its attention weights, the mean over heads, over the patch grid),
with the teacher's and the student's predictions."""
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # studies/ and the repository
import augment as A  # noqa: E402
import train as T  # noqa: E402
from distill import rebuild  # noqa: E402
from model import read_file  # noqa: E402
from plot import lines  # noqa: E402

CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def cosines(intermediates, a=0, b=1):
    """For each (B, T, D) tensor of tokens, the mean over the B images of the cosine between tokens a and b."""
    return [F.cosine_similarity(x[:, a], x[:, b], dim=-1).mean().item() for x in intermediates]


def load(path):
    ckpt = read_file(path, "checkpoint")
    model = rebuild(ckpt)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def token_cosines(model, data):
    """[the learned tokens' cosine, then the mean cosine after each block over the held-out images]."""
    learned = F.cosine_similarity(model.cls_token.flatten(), model.dist_token.flatten(), dim=0).item()
    x, _ = data.val
    sums, n = None, 0
    for batch in x.split(1000):
        c = cosines(model.forward_intermediates(A.normalize(batch, data.mean, data.std)))
        sums = [s + v * len(batch) for s, v in zip(sums, c)] if sums else [v * len(batch) for v in c]
        n += len(batch)
    return [learned] + [s / n for s in sums]


@torch.no_grad()
def attention_picture(student, teacher, data, path, n=8, zoom=4):
    """Rows: a test image, the class token's attention in the last block, the distillation token's (the mean
    over heads, over the patches, brightest = most), and under each image the teacher's and the student's
    predictions (class head, dist head)."""
    x, y = data.val
    pick = torch.cat([(y == c).nonzero()[:1, 0] for c in range(n)])  # the first test image of classes 0..n-1
    images = x[pick]
    xn = A.normalize(images, data.mean, data.std)
    last = student.forward_intermediates(xn)[-2]  # the last block's input
    block = student.blocks[-1]
    w = block.attn.weights(block.norm1(last)).mean(1)  # (n, T, T), mean over heads
    grid = student.cfg.img_size // student.cfg.patch_size
    maps = [w[:, t, 2:].reshape(n, grid, grid) for t in (0, 1)]  # class, dist token -> the patches
    cls_p, dist_p = (o.argmax(1) for o in student.forward_heads(xn))
    teach_p = teacher(xn).argmax(1)
    S = student.cfg.img_size * zoom
    canvas = Image.new("RGB", (n * (S + 10) + 10, 3 * (S + 10) + 60), "white")
    d = ImageDraw.Draw(canvas)
    for i in range(n):
        tiles = [images[i, 0].float() / 255] + [m[i] / m[i].max() for m in maps]
        for r, tile in enumerate(tiles):
            t = F.interpolate(tile[None, None], size=(S, S), mode="nearest")[0, 0]
            canvas.paste(Image.fromarray((t * 255).byte().numpy(), "L"), (10 + i * (S + 10), 10 + r * (S + 10)))
        d.text((10 + i * (S + 10), 3 * (S + 10) + 5),
               f"true {CLASSES[y[pick[i]]]}\nteacher {CLASSES[teach_p[i]]}\ncls {CLASSES[cls_p[i]]}\n"
               f"dist {CLASSES[dist_p[i]]}", fill="black")
    canvas.save(path)


def main(out):
    args = T.get_parser().parse_args(["--data", "fashion-mnist"])
    from data import load_data
    data = load_data(args, torch.device("cpu"), 28)
    rows = {name: token_cosines(load(os.path.join(out, name, "ckpt.pt")), data) for name in ("hard", "labels")}
    labels = ["the tokens as learned"] + [f"after block {i}" for i in range(1, len(rows["hard"]))]
    print("| cosine of class and distillation token (mean over the 10,000 test images) | hard distillation | "
          "second class token (labels) |\n|---|---|---|")
    for i, label in enumerate(labels):
        print(f"| {label} | {rows['hard'][i]:.3f} | {rows['labels'][i]:.3f} |")
    lines({"hard distillation": {i: [v] for i, v in enumerate(rows["hard"])},
           "second class token": {i: [v] for i, v in enumerate(rows["labels"])}},
          os.path.join(out, "token-cosine.png"), "depth (0: the tokens as learned, i: after block i)", "cosine",
          "class token vs distillation token, deit_nano_distilled_patch7_28 on Fashion-MNIST", log_x=False)
    attention_picture(load(os.path.join(out, "hard", "ckpt.pt")), load(os.path.join(out, "teacher", "ckpt.pt")),
                      data, os.path.join(out, "token-attention.png"))


if __name__ == "__main__":
    main(sys.argv[1])
