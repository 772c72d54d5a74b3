"""A picture of a run across policies: divergence, answer length and rubric score (needs matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from rgsd_pipeline.shards import write_text_atomic


def plot_iterations(frame: pl.DataFrame, out: Path, title: str) -> None:
    """Three panels over the policies of `inspect.iterations`: divergence, length, judge score with intervals."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'rgsd-pipeline[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = frame["index"].to_list()
    labels = frame["policy"].to_list()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)

    def line(ax, column: str, label: str, **style):
        if column in frame.columns and frame[column].drop_nulls().len():
            values = [float("nan") if v is None else v for v in frame[column].to_list()]
            ax.plot(x, values, marker="o", label=label, **style)

    line(axes[0], "sampled_logprob_gap", "training rollouts: log π_student − log π_teacher")
    line(axes[0], "heldout_divergence", "held-out answers: JSD(β) teacher vs policy")
    axes[0].set_title("teacher–student divergence per token")
    line(axes[1], "rollout_length", "training rollouts")
    line(axes[1], "eval_length", "held-out answers")
    axes[1].set_title("mean response length (tokens)")
    scores = [c[len("score["):-1] for c in frame.columns if c.startswith("score[")]
    for slug in scores:
        mean, low, high = (frame[f"{name}[{slug}]"].to_list() for name in ("score", "score_low", "score_high"))
        points = [(i, m, lo, hi) for i, m, lo, hi in zip(x, mean, low, high, strict=True) if m is not None]
        if points:
            xs, ms, los, his = zip(*points, strict=True)
            below = [m - lo for m, lo in zip(ms, los, strict=True)]
            above = [hi - m for m, hi in zip(ms, his, strict=True)]
            axes[2].errorbar(xs, ms, yerr=[below, above],
                             marker="o", capsize=3, label=slug)
    axes[2].set_title("rubric score (judge, 95% interval)")
    if not scores:
        axes[2].text(0.5, 0.5, "no judge evaluation yet\n(rgsd-pipeline evaluate --judge-url ...)",
                     ha="center", va="center", transform=axes[2].transAxes, color="#777")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_text_atomic(out, image.getvalue())
