"""Training metrics: one JSON line per step, and a PNG of the curves."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped (they will be redone).
    Non-finite numbers are written as null (strict JSON)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL; an unreadable last line (a run killed mid-write) is dropped with a
    warning, an unreadable line elsewhere is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
            warnings.warn(f"{path}: dropping its incomplete last line", stacklevel=2)
    return records


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
        ax.plot(steps, [math.nan if r.get(key) is None else r[key] for r in rows], label=label)
    for ax, title in zip(axes, ("BT-normalised reward", "REBEL loss", "mean weight per expert"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return Path(png)
