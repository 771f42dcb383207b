"""The studies' pictures, drawn with matplotlib (a studies-only dependency: studies/requirements.txt; the
library and its tests never import it)."""
import matplotlib

matplotlib.use("Agg")  # no screen: write PNGs
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})


def lines(series, path, x_label, y_label, title, log_x=True, ax=None, colours=None):
    """series: {label: {x: [values]}}: one line per label through the mean of the values at each x, the range
    of the values (the seeds) shaded. Writes path (or draws on ax and returns it). colours: {label: colour}."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (label, s) in enumerate(series.items()):
        xs = sorted(s)
        mean = [sum(s[x]) / len(s[x]) for x in xs]
        line, = ax.plot(xs, mean, "o-", label=label, lw=2, ms=5, color=(colours or {}).get(label, f"C{i}"))
        if any(len(s[x]) > 1 for x in xs):
            ax.fill_between(xs, [min(s[x]) for x in xs], [max(s[x]) for x in xs], color=line.get_color(), alpha=0.2)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(sorted({x for s in series.values() for x in s}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.minorticks_off()
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    if own:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return ax


def panels(groups, path, x_label, y_label, suptitle, log_x=False):
    """groups: {panel title: {label: {x: [values]}}}: one panel of lines() each, side by side (those with
    data), one legend, each label one colour throughout."""
    groups = {t: g for t, g in groups.items() if g}
    if not groups:
        return
    labels = list(dict.fromkeys(label for g in groups.values() for label in g))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 2, 4.2), sharey=True, squeeze=False)
    for ax, (title, series) in zip(axes[0], groups.items()):
        lines(series, None, x_label, y_label if ax is axes[0][0] else "", title, log_x=log_x, ax=ax, colours=colours)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}  # every label once, in order
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
