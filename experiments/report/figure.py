"""The Fig. 3 analogue: accuracy against uploaded megabytes per federated model, as a PNG.

matplotlib is imported only when the figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

from experiments.report.cells import by_pair, finite, model_label, models_present


def plot_fig3(runs: list[dict], out_png: Path) -> None:
    """Fig. 3 analogue: clean accuracy (%) and clean 1-NED against cumulative raw MB uploaded per
    edge, one line per model, from the federated runs' ``curve``; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = by_pair(runs)
    fig = Figure(figsize=(11.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_ned = fig.subplots(1, 2)
    drawn = 0
    for model in models_present(runs):
        run = index.get((model, "federated"))
        curve = run.get("curve") if run is not None else None
        if not isinstance(curve, list) or not curve:
            continue
        points = [p for p in curve if isinstance(p, dict)]
        points.sort(key=lambda p: finite(p.get("round")) or 0.0)
        x = [finite(p.get("upload_mb_per_edge")) for p in points]
        acc = [finite(p.get("clean_accuracy")) for p in points]
        ned = [finite(p.get("clean_char_accuracy")) for p in points]
        label = model_label(model, runs)
        xy_acc = [(a, b * 100.0) for a, b in zip(x, acc, strict=True) if a is not None and b is not None]
        xy_ned = [(a, b) for a, b in zip(x, ned, strict=True) if a is not None and b is not None]
        if xy_acc:
            ax_acc.plot(*zip(*xy_acc, strict=True), marker="o", label=label)
        if xy_ned:
            ax_ned.plot(*zip(*xy_ned, strict=True), marker="o", label=label)
        drawn += bool(xy_acc or xy_ned)
    ax_acc.set_xlabel("cumulative upload per edge (MB, raw)")
    ax_acc.set_ylabel("word accuracy on clean (%)")
    ax_ned.set_xlabel("cumulative upload per edge (MB, raw)")
    ax_ned.set_ylabel("1-NED on clean")
    for ax in (ax_acc, ax_ned):
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no federated runs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Fig. 3 analogue")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
