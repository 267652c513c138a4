"""What `tli-recipe eval` measures and prints: held-out loss and downstream accuracy, per model.

The held-out loss comes from :mod:`tli_recipe.training.evaluate` (every model on the same
tokens); accuracies come from lm-evaluation-harness through :mod:`tli_recipe.training.lmeval`
(optional extra). Tasks and models are checked before the first model is scored, so a typo in
the last task name costs seconds, not an evaluation.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tli_recipe.errors import TliError


@dataclass
class EvalReport:
    models: list[str]
    loss: list[Any] = field(default_factory=list)  # EvalResult per model, when --data was given
    tasks: list[Any] = field(default_factory=list)  # TaskScore per model and task, when --tasks was given
    asked_tasks: bool = False

    def table(self) -> str:
        from tli_recipe.training.evaluate import results_table
        from tli_recipe.training.lmeval import scores_table

        parts = ([results_table(self.loss)] if self.loss else []) + (
            [scores_table(self.tasks)] if self.asked_tasks else []
        )
        return "\n\n".join(parts)

    def to_json(self) -> str:
        """The loss rows as a list (as before --tasks existed); with --tasks an object {models, loss, tasks}."""
        loss = [r.to_dict() for r in self.loss]
        if not self.asked_tasks:
            return json.dumps(loss, indent=2)
        return json.dumps({"models": self.models, "loss": loss, "tasks": [r.to_dict() for r in self.tasks]}, indent=2)


def run_eval(
    models: Sequence[str | Path],
    *,
    data: Sequence[str | Path] = (),
    tasks: Sequence[str] = (),
    limit: Optional[int] = None,
    online: bool = False,
    tokenizer: Optional[str | Path] = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    log: Callable[[str], None] = lambda m: None,
    **loss_options,
) -> EvalReport:
    """Loss on ``data`` and lm-eval ``tasks`` for every model; ``loss_options`` go to ``evaluate_models``."""
    if not data and not tasks:
        raise TliError(
            "nothing to evaluate: pass --data FILE (held-out loss) and/or --tasks NAME|FILE.yaml "
            "(accuracy with lm-evaluation-harness)"
        )
    report = EvalReport(models=[str(m) for m in models], asked_tasks=bool(tasks))
    task_set = None
    if tasks:
        from tli_recipe.training.lmeval import TaskSet

        task_set = TaskSet(tasks, online=online, limit=limit)  # every task loads (or fails) before a model does
        task_set.check_models(models, tokenizer)
    if data:
        from tli_recipe.training.evaluate import evaluate_models

        report.loss = evaluate_models(
            models,
            data,
            batch_size=batch_size,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            log=log,
            **loss_options,
        )
    if task_set is not None:
        report.tasks = task_set.score_models(
            models, log=log, device=device, dtype=dtype, batch_size=batch_size, limit=limit, tokenizer=tokenizer
        )
    return report


def value_axis(lows: Sequence[float], highs: Sequence[float], headroom: float = 0.35) -> tuple[float, float]:
    """The y range of a bar chart of close values: from a little below the smallest value (never below 0, as
    losses and accuracies are not negative) to above the largest, with ``headroom`` of the spread on top for
    the value labels. A bar chart from 0 would make 4.20 and 3.98 look alike; the labels carry the values."""
    lo, hi = min(lows), max(highs)
    spread = hi - lo
    pad = max(spread * 0.25, abs(hi) * 0.02, 1e-3)  # one model, or equal values: still a visible bar
    return max(0.0, lo - pad), hi + max(spread * headroom, pad)


def report_figure(report: EvalReport):
    """The figure of :func:`plot_report` (a matplotlib ``Figure``, no pyplot state): a bar per model labelled
    with its loss (3 decimals), a bar per task and model labelled ``acc ± stderr``; each y axis spans the data,
    not 0 to the largest value. None when there is nothing to plot."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r.task for r in report.tasks))
    panels = (1 if report.loss else 0) + (1 if tasks else 0)
    if not panels:
        return None
    fig = Figure(figsize=(5 * panels + 1, 4), dpi=100)
    axis = iter(fig.subplots(1, panels, squeeze=False)[0])
    names = [Path(m).name or m for m in report.models]
    if report.loss:
        ax = next(axis)
        losses = [r.loss for r in report.loss]
        bars = ax.bar(range(len(losses)), losses, color="tab:blue")
        ax.bar_label(bars, [f"{v:.3f}" for v in losses], padding=2, fontsize=8)
        ax.set_ylim(*value_axis(losses, losses))
        ax.set_xticks(range(len(losses)), [Path(r.model).name for r in report.loss], rotation=20, ha="right")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title("loss (lower is better)")
    if tasks:
        ax = next(axis)
        width = 0.8 / len(report.models)
        lows, highs = [], []
        for j, model in enumerate(report.models):
            rows = {r.task: r for r in report.tasks if r.model == model and r.acc is not None}
            shown = [i for i, t in enumerate(tasks) if t in rows]  # a task without an accuracy gets no bar
            accs = [rows[tasks[i]].acc for i in shown]
            errs = [rows[tasks[i]].acc_stderr or 0.0 for i in shown]
            xs = [i + j * width for i in shown]
            ax.bar(xs, accs, width, yerr=errs, capsize=3, label=names[j])
            for x, acc, err in zip(xs, accs, errs):
                ax.annotate(
                    f"{acc:.3f}±{err:.3f}",
                    (x, acc + err),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90 if len(report.models) > 2 else 0,
                )
            lows += [a - e for a, e in zip(accs, errs)]
            highs += [a + e for a, e in zip(accs, errs)]
        if lows:
            # rotated labels (more than two models) stand taller: more room on top
            ax.set_ylim(*value_axis(lows, highs, headroom=0.35 if len(report.models) <= 2 else 0.8))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set_ylabel("accuracy (bars: ± 1 stderr)")
        ax.set_title("lm-eval tasks (higher is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_report(report: EvalReport, path: Path) -> bool:
    """A PNG beside the JSON: held-out loss per model, and accuracy ± stderr per task and model (see
    :func:`report_figure`). False (and no file) without matplotlib or without anything to plot."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    fig = report_figure(report)
    if fig is None:
        return False
    fig.savefig(path)
    return True
