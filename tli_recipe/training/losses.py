"""A stage's loss history: rows from the Trainer's log, ``losses.csv`` and ``losses.png``."""

from __future__ import annotations

import csv
from pathlib import Path


def loss_rows(history: list[dict]) -> list[dict]:
    """One row per step from the Trainer's log history: step, epoch, learning_rate, loss, eval_loss."""
    rows: dict[int, dict] = {}
    for entry in history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        row = rows.setdefault(int(entry.get("step", 0)), {"step": int(entry.get("step", 0))})
        for key in ("epoch", "learning_rate", "loss", "eval_loss"):
            if key in entry:
                row[key] = entry[key]
    return [rows[k] for k in sorted(rows)]


def write_losses(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "learning_rate", "loss", "eval_loss"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})


def plot_losses(rows: list[dict], path: Path, title: str) -> bool:
    """A PNG of the training and validation loss; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
