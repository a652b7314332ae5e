"""Pictures of what people compare: loss curves, and held-out scores per adapter version."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(history: list[dict], path: Path, title: str) -> Path:
    """The training loss per step; SFT's (token-mean cross-entropy) and DPO's (the preference
    loss, entries with stage "dpo") as two lines: they are not on one scale."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(p.get("stage", "sft") for p in history):
        points = [p for p in history if p.get("stage", "sft") == stage]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".", lw=1, label=stage.upper())
    ax.set(xlabel="step", ylabel="training loss", title=title)
    if len(ax.lines) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def champion_vs_candidate(champion: list[float], candidate: list[float], path: Path, title: str) -> Path:
    """Per-example held-out NLL: each point is one held-out correction; below the diagonal the
    candidate is better."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(champion, candidate, s=14, alpha=0.7)
    low, high = min(champion + candidate), max(champion + candidate)
    ax.plot([low, high], [low, high], color="grey", lw=1, ls="--")
    ax.set(xlabel="champion NLL", ylabel="candidate NLL", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def versions_over_time(points: list[dict], path: Path, title: str) -> Path:
    """Held-out NLL of every evaluated adapter version, in order ('base' is the bare model)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [p["label"] for p in points]
    colors = {"champion": "tab:green", "rejected": "tab:red", "retired": "tab:grey", "candidate": "tab:blue"}
    ax.bar(labels, [p["nll"] for p in points], color=[colors.get(p.get("status"), "tab:grey") for p in points])
    ax.set(xlabel="adapter version", ylabel="held-out NLL (lower is better)", title=title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
