"""Training metrics: one JSON line per step, and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(jsonl: str | Path, png: str | Path) -> Path:
    """Reward (overall and per dimension), loss and mean expert weights against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(jsonl) if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rows]
    series = [("reward", "reward", axes[0]), ("loss", "loss", axes[1])]
    for key in sorted({k for r in rows for k in r if k.startswith("reward/")}):
        series.append((key, key.removeprefix("reward/"), axes[0]))
    for key in sorted({k for r in rows for k in r if k.startswith("weight/")}):
        series.append((key, key.removeprefix("weight/"), axes[2]))
    for key, label, ax in series:
        ax.plot(steps, [r.get(key, math.nan) for r in rows], label=label)
    for ax, title in zip(axes, ("BT-normalised reward", "REBEL loss", "mean weight per expert"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return Path(png)
