"""A line plot as a PNG with PIL alone (the project needs no matplotlib): one line per series through the
mean of its values at each x, the range of its values shaded; x on a log scale or not."""
import math

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def lines(series, path, x_label, y_label, title, log_x=True, y_step=5, size=(900, 560)):
    """series: {label: {x: [values]}}; writes path. y_step: the grid's spacing (and rounding of the range)."""
    W, H = size
    left, right, top, bottom = 80, 250, 50, 60
    xs = sorted({x for s in series.values() for x in s})
    ys = [v for s in series.values() for vals in s.values() for v in vals]
    if not xs:
        return
    lo, hi = math.floor(min(ys) / y_step) * y_step, math.ceil(max(ys) / y_step) * y_step
    hi = hi if hi > lo else lo + y_step
    scale = math.log10 if log_x else float
    x0, x1 = scale(xs[0]), scale(xs[-1]) if len(xs) > 1 else scale(xs[0]) + 1
    px = lambda x: left + (scale(x) - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: top + (hi - y) / (hi - lo) * (H - top - bottom)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im, "RGBA")
    for i in range(round((hi - lo) / y_step) + 1):  # the grid and the axes' numbers
        y = lo + i * y_step
        d.line([(left, py(y)), (W - right, py(y))], fill=(225, 225, 225))
        d.text((left - 35, py(y) - 6), f"{y:g}", fill="black")
    for x in xs:
        d.line([(px(x), top), (px(x), H - bottom)], fill=(225, 225, 225))
        d.text((px(x) - 15, H - bottom + 8), f"{x:,}", fill="black")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((left, 15), title, fill="black")
    d.text(((left + W - right) / 2 - 60, H - 25), x_label, fill="black")
    d.text((5, top - 25), y_label, fill="black")
    for i, (label, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(s.items())
        band = [(px(x), py(max(v))) for x, v in pts] + [(px(x), py(min(v))) for x, v in reversed(pts)]
        if len(pts) > 1:
            d.polygon(band, fill=colour + (50,))
        mid = [(px(x), py(sum(v) / len(v))) for x, v in pts]
        if len(mid) > 1:
            d.line(mid, fill=colour, width=3)
        for x, y in mid:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        d.line([(W - right + 15, top + 20 + 22 * i), (W - right + 40, top + 20 + 22 * i)], fill=colour, width=3)
        d.text((W - right + 48, top + 14 + 22 * i), label, fill="black")
    im.save(path)
