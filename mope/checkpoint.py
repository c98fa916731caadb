"""Atomic training checkpoints: ``<run>/checkpoints/step_000010/{pcm/, trainer.pt}``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def atomic_directory(final: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` by renames, so a
    reader never sees a half-written directory (a crash leaves only a ``.tmp-*`` sibling behind). An
    existing ``final`` is replaced only if it is empty or a previous save (it holds the file ``marker``)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ValueError(f"cannot save to {final}: it is a file")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).is_file():
        raise ValueError(f"cannot save to {final}: a non-empty directory that is not a previous save "
                         f"(no {marker}); its files are left alone, choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step under ``run_dir``, or None."""
    root = Path(run_dir) / CHECKPOINTS
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "trainer.pt").is_file())
    return steps[-1] if steps else None


def save_checkpoint(run_dir: str | Path, step: int, pcm, trainer_state: dict) -> Path:
    """Write the PCM (``pcm.save``) and the trainer state (optimiser, schedule, RNG, step, config)."""
    final = checkpoint_dir(run_dir, step)
    with atomic_directory(final, "trainer.pt") as tmp:
        pcm.save(tmp / "pcm")
        torch.save({**trainer_state, "step": step}, tmp / "trainer.pt")
    return final


def load_trainer_state(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / "trainer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"not a checkpoint (no trainer.pt): {checkpoint}")
    return torch.load(path, map_location="cpu", weights_only=True)
