"""What the distillation token learns (paper §4, "Distillation token"), after studies/distillation.sh has trained a
hard-distilled student (hard-0), the same student whose dist token learns the labels instead (labels-0: the
paper's second class token) and their convnet teacher (teacher), each keeping its weights in LOGS/NAME/weights.pt.

python studies/tokens.py LOGS measures the mean cosine, over the 10,000 Fashion-MNIST test images, between the
class token and the distillation token as learned (the embeddings themselves) and after each block, into
LOGS/tokens/log.jsonl, and draws LOGS/token-attention.png: for 8 test images, where the class token and the
distillation token look in the last block (its attention weights, the mean over heads, over the patch grid),
with the teacher's and the student's predictions. python studies/tokens.py --report LOGS RUNS prints the
table from the log and draws it as RUNS/token-cosine.png."""
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # studies/ and the repository
import augment as A  # noqa: E402
from data import load_data  # noqa: E402
from distill import rebuild  # noqa: E402
from model import read_file  # noqa: E402

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
def attention_picture(student, teacher, data, path, n=8):
    """Rows: a test image, the class token's attention in the last block, the distillation token's (the mean
    over heads, over the patches, brightest = most); over each column the true class, and the teacher's and the
    student's predictions (class head, dist head)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n + 1.2, 5.6))
    for i in range(n):
        for r, tile in enumerate([images[i, 0].float() / 255] + [m[i] / m[i].max() for m in maps]):
            axes[r, i].imshow(tile.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, i].set_xticks([]), axes[r, i].set_yticks([])
        axes[0, i].set_title(f"true {CLASSES[y[pick[i]]]}\nteacher {CLASSES[teach_p[i]]}\ncls {CLASSES[cls_p[i]]}\n"
                             f"dist {CLASSES[dist_p[i]]}", fontsize=8)
    for r, label in enumerate(["image", "class token", "distillation token"]):
        axes[r, 0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)


def measure(logs):
    """From the kept weights of the study's cells (LOGS/hard-0, labels-0, teacher): the cosines, one line per depth, in
    LOGS/tokens/log.jsonl, and LOGS/token-attention.png."""
    data = load_data("fashion-mnist", "cpu", 28)
    rows = {name: token_cosines(load(os.path.join(logs, f"{name}-0", "weights.pt")), data) for name in ("hard", "labels")}
    attention_picture(load(os.path.join(logs, "hard-0", "weights.pt")), load(os.path.join(logs, "teacher", "weights.pt")),
                      data, os.path.join(logs, "token-attention.png"))
    os.makedirs(os.path.join(logs, "tokens"), exist_ok=True)
    with open(os.path.join(logs, "tokens", "log.jsonl"), "w") as f:
        for depth, (h, l) in enumerate(zip(rows["hard"], rows["labels"])):
            f.write(json.dumps({"depth": depth, "hard": h, "labels": l}) + "\n")


def report(logs, runs):
    """The table, and RUNS/token-cosine.png, from LOGS/tokens/log.jsonl."""
    from plot import lines  # matplotlib: the studies' requirement (the tests import this file without it)
    rows = [json.loads(l) for l in open(os.path.join(logs, "tokens", "log.jsonl"))]
    print("| cosine of class and distillation token (mean over the 10,000 test images) | hard distillation | "
          "second class token (labels) |\n|---|---|---|")
    for r in rows:
        where = "the tokens as learned" if r["depth"] == 0 else f"after block {r['depth']}"
        print(f"| {where} | {r['hard']:.3f} | {r['labels']:.3f} |")
    lines({"hard distillation": {r["depth"]: [r["hard"]] for r in rows},
           "second class token": {r["depth"]: [r["labels"]] for r in rows}},
          os.path.join(runs, "token-cosine.png"), "depth (0: the tokens as learned, i: after block i)", "cosine",
          "class token vs distillation token, deit_nano_distilled_patch7_28 on Fashion-MNIST", log_x=False)


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(sys.argv[2], sys.argv[3])
    else:
        measure(sys.argv[1])
