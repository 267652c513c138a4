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
    loss: list[Any] = field(default_factory=list)   # EvalResult per model, when --data was given
    tasks: list[Any] = field(default_factory=list)  # TaskScore per model and task, when --tasks was given
    asked_tasks: bool = False

    def table(self) -> str:
        from tli_recipe.training.evaluate import results_table
        from tli_recipe.training.lmeval import scores_table

        parts = ([results_table(self.loss)] if self.loss else []) + ([scores_table(self.tasks)] if self.asked_tasks else [])
        return "\n\n".join(parts)

    def to_json(self) -> str:
        """The loss rows as a list (as before --tasks existed); with --tasks an object {models, loss, tasks}."""
        loss = [r.to_dict() for r in self.loss]
        if not self.asked_tasks:
            return json.dumps(loss, indent=2)
        return json.dumps({"models": self.models, "loss": loss, "tasks": [r.to_dict() for r in self.tasks]}, indent=2)


def run_eval(models: Sequence[str | Path], *, data: Sequence[str | Path] = (), tasks: Sequence[str] = (),
             limit: Optional[int] = None, online: bool = False, tokenizer: Optional[str | Path] = None,
             batch_size: int = 8, dtype: str = "float32", device: str = "auto",
             log: Callable[[str], None] = lambda m: None, **loss_options) -> EvalReport:
    """Loss on ``data`` and lm-eval ``tasks`` for every model; ``loss_options`` go to ``evaluate_models``."""
    if not data and not tasks:
        raise TliError("nothing to evaluate: pass --data FILE (held-out loss) and/or --tasks NAME|FILE.yaml "
                       "(accuracy with lm-evaluation-harness)")
    report = EvalReport(models=[str(m) for m in models], asked_tasks=bool(tasks))
    task_set = None
    if tasks:
        from tli_recipe.training.lmeval import TaskSet, check_model

        task_set = TaskSet(tasks, online=online)  # every task loads (or fails) before a model does
        for model in models:
            check_model(Path(model), tokenizer)
    if data:
        from tli_recipe.training.evaluate import evaluate_models

        report.loss = evaluate_models(models, data, batch_size=batch_size, tokenizer=tokenizer, device=device,
                                      dtype=dtype, log=log, **loss_options)
    for model in models if task_set else ():
        log(f"lm-eval: {', '.join(task_set.specs)} on {model}")
        report.tasks.extend(task_set.score(model, device=device, dtype=dtype, batch_size=batch_size, limit=limit,
                                           tokenizer=tokenizer))
    return report
