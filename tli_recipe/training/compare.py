"""compare: grow one base model with several recipes, train each for the same token budget, compare.

For every recipe: grow (``execute_plan``), held-out loss at init (``evaluate_models``), then one
stage of the recipe (its first, or ``--stage NAME``) trained for exactly ``steps`` optimizer
steps of ``batch_size`` packed sequences of ``sequence_length`` tokens, so every model sees the
same tokens in the same order, then the held-out loss again. A recipe with neither ``slices``
nor ``inject`` is the control: the base model itself, trained for the same budget. With
``tasks`` (lm-eval task names or task files) every model is also scored on those tasks at init
and after training; the tasks load before anything is grown, so a bad one fails at once.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

#: What an interrupted compare leaves.
START_OVER = "no tables were written; the same command starts over"


@dataclass
class CompareRow:
    recipe: str
    name: str
    stage: str
    layers: int
    parameters: int
    trainable: int
    function_preserving: bool
    init_loss: float
    final_loss: float
    grow_seconds: float
    train_seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    step_seconds: Optional[float] = None  # the Trainer's train_runtime per optimizer step (no evaluation in it)
    forward_tokens_per_second: Optional[float] = None  # the grown model's held-out forward passes at init, no gradient
    active_parameters: Optional[int] = None  # per token: all of them, or for an MoE the experts a token is routed to
    objective: str = "lm"
    # lm-eval accuracies (--tasks): task -> {"acc": ..., "acc_stderr": ...} at init and after training
    init_tasks: dict[str, dict] = field(default_factory=dict)
    final_tasks: dict[str, dict] = field(default_factory=dict)


def _loss_logger():
    from transformers import TrainerCallback

    class Logger(TrainerCallback):
        def __init__(self) -> None:
            self.curve: list[tuple[int, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
            if logs and "loss" in logs:
                self.curve.append((state.global_step, float(logs["loss"])))

    return Logger()


def _checked_plans(recipes: Sequence[str | Path], overrides: Sequence[str], stage: Optional[str], log) -> list:
    """Every recipe compiled and its stage checked, before anything is grown or trained."""
    from tli_recipe.errors import TliError
    from tli_recipe.plan.compile import compile_plan
    from tli_recipe.recipe.load import load_recipe
    from tli_recipe.source.hub import Access

    # A hub id not in the cache is downloaded (as `run` does); HF_HUB_OFFLINE=1 forbids it.
    plans = [compile_plan(load_recipe(recipe, overrides), Access(fetch="weights", log=log)) for recipe in recipes]
    for recipe, plan in zip(recipes, plans):
        names = [s.name for s in plan.stages]
        if not names:
            raise TliError(f"{recipe}: defines no stages; add the stage to compare (e.g. one that trains [injected])")
        if stage and stage not in names:
            raise TliError(f"{recipe}: has no stage '{stage}'; its stages: {', '.join(names)}")
    seen = [p.name for p in plans]
    if len(set(seen)) != len(seen):
        raise TliError(
            f"two recipes share a name ({', '.join(sorted({n for n in seen if seen.count(n) > 1}))}); "
            "give each a distinct name (their outputs go to --work/<name>)"
        )
    return plans


def compare_recipes(
    recipes: Sequence[str | Path],
    data: Sequence[str | Path],
    heldout: Sequence[str | Path],
    *,
    work: Path,
    steps: int,
    stage: Optional[str] = None,
    overrides: Sequence[str] = (),
    sequence_length: int = 256,
    batch_size: int = 4,
    eval_sequences: Optional[int] = None,
    device: str = "auto",
    tasks: Sequence[str] = (),
    task_limit: Optional[int] = None,
    online: bool = False,
    log: Callable[[str], None] = print,
) -> list[CompareRow]:
    from tli_recipe.execute.executor import execute_plan
    from tli_recipe.training.evaluate import evaluate_models
    from tli_recipe.training.train import Preempted, Preemption, stage_configs, train_stage

    # SIGTERM or a first Ctrl-C stops at the next step boundary with a checkpoint; a second Ctrl-C at once.
    with Preemption() as preemption:
        plans = _checked_plans(recipes, overrides, stage, log)
        task_set = None
        if tasks:
            from tli_recipe.training.lmeval import TaskSet

            task_set = TaskSet(tasks, online=online, limit=task_limit)

        def accuracies(model: Path) -> dict[str, dict]:
            if task_set is None:
                return {}
            return {
                r.task: {"acc": r.acc, "acc_stderr": r.acc_stderr}
                for r in task_set.score_models([model], log=log, device=device, limit=task_limit)
            }

        rows = []
        work.mkdir(parents=True, exist_ok=True)
        for recipe, plan in zip(recipes, plans):
            if preemption.requested:
                raise Preempted(
                    f"{preemption.name}: compare stopped before {plan.name}; {START_OVER}", preemption.signum
                )
            folder = work / plan.name
            started = time.perf_counter()
            grown = execute_plan(plan, folder / "grown", force=True, progress=False, log=log)
            grow_seconds = time.perf_counter() - started

            def held_out(model: Path) -> tuple[float, float]:
                """The held-out loss, and the forward pass's throughput on it (tokens per second, no gradient;
                loading and tokenizing not counted)."""
                [result] = evaluate_models(
                    [model], heldout, sequence_length=sequence_length, max_sequences=eval_sequences, device=device
                )
                return result.loss, (result.tokens + result.sequences) / max(result.forward_seconds, 1e-9)

            (init, forward_rate), init_tasks = held_out(grown), accuracies(grown)
            cfg = stage_configs(grown, data=data, stages=[stage or plan.stages[0].name], into=folder / "trained")[0]
            arguments = {
                k: v
                for k, v in cfg.training_arguments.items()
                if k not in ("num_train_epochs", "eval_steps", "save_steps")
            }
            arguments.update(
                max_steps=steps,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=1,
                logging_steps=1,
                eval_strategy="no",
                save_strategy="no",
                report_to=[],
                seed=0,
                data_seed=0,
            )
            # every compared stage starts from the grown model, whatever its position, and sees the same tokens
            cfg = cfg.model_copy(
                update={
                    "model": str(grown),
                    "sequence_length": sequence_length,
                    "validation_fraction": 0.0,
                    "training_arguments": arguments,
                }
            )
            warmup = int(arguments.get("warmup_steps") or 0)
            if warmup >= steps:
                log(
                    f"warning: {plan.name}: stage '{cfg.stage}' warms up for {warmup} steps and compare trains "
                    f"{steps}: "
                    f"the learning rate never reaches its peak ({cfg.training_arguments.get('learning_rate')}); "
                    f"use --steps above {warmup} or --set 'stages[*].warmup_steps=...'"
                )
            logger = _loss_logger()
            started = time.perf_counter()
            try:  # restart: a run left by an interrupted compare is not resumed (its loss curve would be cut)
                trained = train_stage(
                    cfg,
                    device=device,
                    force=True,
                    restart=True,
                    progress=False,
                    log=log,
                    callbacks=[logger],
                    preemption=preemption,
                )
            except Preempted:
                raise Preempted(
                    f"{preemption.name}: compare stopped while training {plan.name} (after step "
                    f"{logger.curve[-1][0] if logger.curve else 0} of {steps}); {START_OVER}",
                    preemption.signum,
                ) from None
            train_seconds = time.perf_counter() - started
            (final, _), final_tasks = held_out(trained), accuracies(trained)
            sp = next(s for s in plan.stages if s.name == cfg.stage)
            metrics = (
                json.loads((trained / "training_metrics.json").read_text())
                if (trained / "training_metrics.json").is_file()
                else {}
            )
            rows.append(
                CompareRow(
                    recipe=str(recipe),
                    name=plan.name,
                    stage=cfg.stage,
                    layers=plan.totals.layers_after,
                    parameters=plan.totals.parameters_after,
                    trainable=int(metrics.get("trainable_parameters", sp.trainable_parameters)),
                    function_preserving=plan.function_preserving,
                    init_loss=init,
                    final_loss=final,
                    grow_seconds=grow_seconds,
                    train_seconds=train_seconds,
                    curve=logger.curve,
                    init_tasks=init_tasks,
                    final_tasks=final_tasks,
                    objective=sp.settings.objective,
                    forward_tokens_per_second=forward_rate,
                    active_parameters=plan.upcycle.parameters_active if plan.upcycle else plan.totals.parameters_after,
                    step_seconds=metrics["train_seconds"] / metrics["global_step"]
                    if metrics.get("train_seconds") and metrics.get("global_step")
                    else None,
                )
            )
            log(f"{plan.name}: held-out loss {init:.4f} at init, {final:.4f} after {steps} steps of '{cfg.stage}'")
        return rows


def _task_names(rows: Sequence[CompareRow]) -> list[str]:
    return list(dict.fromkeys(t for r in rows for t in (*r.init_tasks, *r.final_tasks)))


def _acc(scores: dict[str, dict], task: str) -> str:
    acc = scores.get(task, {}).get("acc")
    if acc is None:
        return "-"
    stderr = scores[task].get("acc_stderr")
    return f"{acc:.3f} ± {stderr:.3f}" if stderr is not None else f"{acc:.3f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def table(rows: Sequence[CompareRow], steps: int) -> str:
    tasks = _task_names(rows)
    head = (
        "| recipe | stage | layers | params (active) | trainable params | preserving | held-out loss at init | "
        f"after {steps} steps | train time (s) | s/step | fwd tok/s |"
        + "".join(f" {t} acc at init | after {steps} steps |" for t in tasks)
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(tasks)]
    for r in rows:
        stage = r.stage + (" (MoD)" if r.objective == "mod" else "")
        per_step = f"{r.step_seconds:.2f}" if r.step_seconds is not None else "-"
        active = r.active_parameters if r.active_parameters is not None else r.parameters
        rate = f"{r.forward_tokens_per_second:.0f}" if r.forward_tokens_per_second else "-"
        lines.append(
            f"| {r.name} | {stage} | {r.layers} | {_millions(r.parameters)} ({_millions(active)}) "
            f"| {_millions(r.trainable)} | {'yes' if r.function_preserving else 'no'} "
            f"| {r.init_loss:.3f} | {r.final_loss:.3f} | {r.train_seconds:.0f} | {per_step} | {rate} |"
            + "".join(f" {_acc(r.init_tasks, t)} | {_acc(r.final_tasks, t)} |" for t in tasks)
        )
    return "\n".join(lines)


def write_outputs(rows: Sequence[CompareRow], folder: Path, steps: int, title: str = "") -> list[Path]:
    """compare.md, compare.csv, compare.json and compare.png (training loss curves) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "compare.md", folder / "compare.csv", folder / "compare.json"]
    written[0].write_text(table(rows, steps) + "\n")
    with open(written[1], "w", newline="") as f:
        w = csv.writer(f)
        tasks = _task_names(rows)
        w.writerow(
            [
                "recipe",
                "stage",
                "layers",
                "parameters",
                "trainable",
                "function_preserving",
                "init_loss",
                "final_loss",
                "grow_seconds",
                "train_seconds",
                "step_seconds",
                "objective",
                "active_parameters",
                "forward_tokens_per_second",
            ]
            + [f"{t}_{m}_{when}" for t in tasks for when in ("init", "final") for m in ("acc", "acc_stderr")]
        )
        for r in rows:
            w.writerow(
                [
                    r.name,
                    r.stage,
                    r.layers,
                    r.parameters,
                    r.trainable,
                    r.function_preserving,
                    f"{r.init_loss:.5f}",
                    f"{r.final_loss:.5f}",
                    f"{r.grow_seconds:.2f}",
                    f"{r.train_seconds:.2f}",
                    "" if r.step_seconds is None else f"{r.step_seconds:.4f}",
                    r.objective,
                    "" if r.active_parameters is None else r.active_parameters,
                    "" if r.forward_tokens_per_second is None else f"{r.forward_tokens_per_second:.1f}",
                ]
                + [
                    "" if (v := scores.get(t, {}).get(m)) is None else f"{v:.5f}"
                    for t in tasks
                    for scores in (r.init_tasks, r.final_tasks)
                    for m in ("acc", "acc_stderr")
                ]
            )
    written[2].write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        return written
    png = folder / "compare.png"
    plot_compare(rows, png, steps, title)
    return written + [png]


def compare_figure(rows: Sequence[CompareRow], steps: int, title: str = ""):
    """The loss curves with the held-out losses as markers (a matplotlib ``Figure``, no pyplot state). Both
    are losses in nats per token, so they share one y axis, labelled with that one quantity; the legend says
    which marks are which: lines the training loss (a moving average), markers the held-out loss."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    window = 1
    for r in rows:
        if r.curve:
            xs, ys = zip(*r.curve)
            # a moving average over 5 steps (or a fifth of the run): single-step losses on small
            # batches are noisy, and every model sees the same batches, so the curves stay comparable
            k = max(1, min(5, len(ys) // 5))
            window = max(window, k)
            smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            (line,) = ax.plot(xs, smooth, label=f"{r.name} ({r.stage})")
            ax.scatter([0], [r.init_loss], color=line.get_color(), marker="o", s=18)
            ax.scatter([xs[-1]], [r.final_loss], color=line.get_color(), marker="s", s=18)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "growth methods at the same token budget")
    handles, _ = ax.get_legend_handles_labels()
    average = f"moving average over {window} steps" if window > 1 else "per step"
    handles += [
        Line2D([], [], color="gray", label=f"lines: training loss ({average})"),
        Line2D([], [], color="gray", marker="o", linestyle="", label="held-out loss at init (step 0)"),
        Line2D([], [], color="gray", marker="s", linestyle="", label=f"held-out loss after {steps} steps"),
    ]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


def plot_compare(rows: Sequence[CompareRow], png: Path, steps: int, title: str = "") -> list[str]:
    """:func:`compare_figure` saved as ``png``; returns the legend's labels."""
    fig = compare_figure(rows, steps, title)
    fig.savefig(png, dpi=110)
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
