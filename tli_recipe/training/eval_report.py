"""What `tli-recipe eval` measures and prints: held-out loss and downstream accuracy, per model.

The held-out loss comes from :mod:`tli_recipe.training.evaluate` (every model on the same
tokens); accuracies come from lm-evaluation-harness through :mod:`tli_recipe.training.lmeval`
(optional extra). Tasks and models are checked before the first model is scored, so a typo in
the last task name costs seconds, not an evaluation.
"""

from __future__ import annotations

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


def plot_report(report: EvalReport, path: Path) -> bool:
    """A PNG beside the JSON: held-out loss per model, and accuracy ± stderr per task and model.
    False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(r.task for r in report.tasks))
    panels = (1 if report.loss else 0) + (1 if tasks else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 4), dpi=100, squeeze=False)
    names = [Path(m).name or m for m in report.models]
    axis = iter(axes[0])
    if report.loss:
        ax = next(axis)
        ax.bar(range(len(report.loss)), [r.loss for r in report.loss], color="tab:blue")
        ax.set_xticks(range(len(report.loss)), [Path(r.model).name for r in report.loss], rotation=20, ha="right")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title("loss (lower is better)")
    if tasks:
        ax = next(axis)
        width = 0.8 / len(report.models)
        for j, model in enumerate(report.models):
            rows = {r.task: r for r in report.tasks if r.model == model}
            accs = [rows[t].acc if t in rows and rows[t].acc is not None else 0 for t in tasks]
            errs = [rows[t].acc_stderr or 0 if t in rows else 0 for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], accs, width, yerr=errs, capsize=3, label=names[j])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set_ylabel("accuracy (bars: ± 1 stderr)")
        ax.set_title("lm-eval tasks (higher is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
