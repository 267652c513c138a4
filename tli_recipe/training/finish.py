"""The end of a stage (rank 0 only): the stage directory written beside its target and renamed into place,
with what it holds for people: the loss history (``losses.csv``, ``losses.png``) and the model card.

Also the work directory's small files: written atomically (a crash never leaves half a JSON for the
resumed run to trip on) and read back tolerantly, and the last checkpoint that is complete.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from tli_recipe._version import __version__
from tli_recipe.errors import TliError
from tli_recipe.execute.card import base_model_lines, model_name
from tli_recipe.files import current_umask, make_folder, named, write_text_atomic
from tli_recipe.plan.model import Plan
from tli_recipe.plan.report import ranges
from tli_recipe.training.builtin import BuiltinStageConfig
from tli_recipe.training.loading import load_model

COMPLETE = "training_metrics.json"  # present only in a finished stage directory


def read_json(path: Path) -> Optional[dict]:
    """A JSON object written by an earlier run, or None (absent, or cut short by a crash)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so that a crash never leaves a half-written file for the next run to trip on."""
    write_text_atomic(path, text)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data))


def last_checkpoint(work: Path) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``work`` whose trainer_state.json reads back (a crash while saving
    leaves a newer one without it, or with half of it), or None."""
    if not work.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in work.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    for _, folder in sorted(steps, reverse=True):
        if read_json(folder / "trainer_state.json") is not None:
            return str(folder)
    return None


#: What a ``checkpoint-N`` of this tool's trainer holds (the Trainer's files, peft's adapter, the MoD head).
RESUME_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "README.md",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
    "mod_head.safetensors",
}
RESUME_PATTERNS = (re.compile(r"model-\d{5}-of-\d{5}\.safetensors"), re.compile(r"rng_state(_\d{1,5})?\.pth"))
#: The pickles the Trainer loads on resume (with torch's safe loader); training_args.bin is never loaded.
RESUME_PICKLES = re.compile(r"(optimizer|scheduler|scaler)\.pt|rng_state(_\d{1,5})?\.pth")


def check_resume(folder: Path) -> None:
    """Refuse, with one line, a resume checkpoint that is not what this tool's trainer writes.

    Only regular files of the known names; the model in safetensors (a ``pytorch_model.bin`` pickle is
    refused by name); and each pickle the Trainer will load is loaded first, the same way (torch's
    ``weights_only`` loader with transformers' numpy allowlist, memory-mapped so the tensors are not
    read), so a hostile one stops here instead of in a traceback from inside the Trainer.
    """
    import zipfile

    fix = f"pass --restart to discard the interrupted run (or remove {folder})"
    for path in sorted(folder.iterdir()):
        name = path.name
        known = name in RESUME_FILES or any(p.fullmatch(name) for p in RESUME_PATTERNS)
        if not known:
            shown = name if len(name) <= 80 and name.isprintable() else repr(name[:80]) + "..."
            raise TliError(
                f"{folder}: holds {shown}, which this tool's trainer does not write (a resumed model is read from "
                f"safetensors only); {fix}"
            )
        if path.is_symlink() or not path.is_file():
            raise TliError(f"{path}: not a regular file; a resume checkpoint holds only files the trainer wrote; {fix}")
    if not any(
        (folder / n).is_file()
        for n in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    ):
        raise TliError(f"{folder}: no model.safetensors or adapter_model.safetensors; {fix}")
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(p for p in folder.iterdir() if RESUME_PICKLES.fullmatch(p.name)):
        if not zipfile.is_zipfile(path):
            raise TliError(f"{path}: not a torch.save archive, as the trainer writes it; {fix}")
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - the unpickler raises many kinds; one line for the user
            text = (str(exc).strip().splitlines() or [""])[0][:160]
            raise TliError(
                f"{path}: refused by torch's safe loader ({type(exc).__name__}: {text}); not what this tool's "
                f"trainer writes; {fix}"
            ) from None


def _private_to_umask(folder: Path) -> None:
    """mkdtemp makes the folder private (0700); the stage output is an ordinary directory."""
    os.chmod(folder, 0o777 & ~current_umask())


def _files_to_umask(folder: Path) -> None:
    """Files some writers create private (safetensors' model.safetensors is 0600) get the umask's modes."""
    umask = current_umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _plan(path: Path):
    from tli_recipe.plan.model import Plan

    try:
        return Plan.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def finish_stage(
    cfg: BuiltinStageConfig,
    trainer,
    out: Path,
    work: Path,
    tok,
    counts: tuple[int, int, int, int],
    final_eval: dict,
    resumed: Optional[str],
    log,
    extra=None,
    replace: bool = False,
    state_dict=None,
) -> None:
    """Write the stage directory next to ``out`` and rename it into place; drop the work directory.
    ``extra(folder)`` writes more files into it (the MoD head). ``replace``: ``out`` held a finished
    stage when training started (``--force``); anything else found at ``out`` now came during the
    run and is left as it is. ``state_dict``: the model's whole tensors when the processes held only
    shards of them (DeepSpeed ZeRO-3), gathered by every process."""
    from tli_recipe.errors import TliError
    from tli_recipe.execute.output import swap_into_place

    if os.path.lexists(out) and not (replace and not out.is_symlink() and (out / COMPLETE).is_file()):
        raise TliError(
            f"{out} appeared while stage '{cfg.stage}' was training; it was left as it is and nothing was "
            f"written; move it away and run the same command again (it resumes from the last checkpoint saved "
            f"in {work})"
        )

    source = Path(cfg.model)
    make_folder(out.parent, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    WRITING.add(tmp)
    try:
        _private_to_umask(tmp)
        model = trainer.accelerator.unwrap_model(trainer.model)
        if cfg.lora:
            adapter = tmp / "adapter"
            model.save_pretrained(adapter, state_dict=state_dict)
            # Merge into freshly loaded, unquantized weights: exact for LoRA, and the only way for QLoRA.
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(source, dtype="auto"), adapter).merge_and_unload()
            state_dict = None
        model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        plan_file = Path(cfg.plan) if cfg.plan else source / "plan.json"
        if plan_file.is_file():
            shutil.copyfile(plan_file, tmp / "plan.json")
        plan = _plan(plan_file)
        (tmp / "training_config.yaml").write_text(
            f"# The config stage '{cfg.stage}' was trained with (tli-recipe {__version__}).\n"
            + yaml.safe_dump(cfg.model_dump(), sort_keys=False)
        )
        metrics = _metrics(cfg, trainer, work, tmp, counts, final_eval, resumed, plan.name if plan else None)
        (tmp / "README.md").write_text(stage_card(cfg, metrics, plan))
        (tmp / COMPLETE).write_text(json.dumps(metrics, indent=2) + "\n")
        if (work / "runs").is_dir():  # --report-to tensorboard logs there
            shutil.copytree(work / "runs", tmp / "runs")
        _files_to_umask(tmp)
        swap_into_place(tmp, out, replace=replace)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk names no file: name the stage output
            raise named(exc, out) from exc
        raise
    finally:
        WRITING.discard(tmp)
    shutil.rmtree(work, ignore_errors=True)
    log(f"stage '{cfg.stage}': wrote {out} ({metrics['global_step']} steps); {summary_line(metrics)}")


#: The temporary folders of stage outputs being written now: a second Ctrl-C, which ends the process at once,
#: removes them first (train.Preemption), so that no half-written stage is left beside its output.
WRITING: set[Path] = set()


#: Training losses averaged for the summary: one step's loss on a small batch is noise.
SMOOTHING_STEPS = 10


def loss_summary(rows: list[dict], final_eval_loss: Optional[float]) -> dict:
    """The losses a stage ends with, from its :func:`loss_rows`: the validation loss at the start (the first
    one logged) and at the end, and the training loss averaged over the last :data:`SMOOTHING_STEPS` steps."""
    train = [r["loss"] for r in rows if r.get("loss") is not None]
    held = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    last = train[-SMOOTHING_STEPS:]
    return {
        "train_loss_first": train[0] if train else None,
        "train_loss_last": train[-1] if train else None,
        "train_loss_smoothed": sum(last) / len(last) if last else None,
        "train_loss_smoothed_steps": len(last),
        "eval_loss_before": held[0] if held else None,
        "eval_loss_after": final_eval_loss,
    }


def summary_line(metrics: dict) -> str:
    """``validation loss A -> B (start -> end); training loss (smoothed over last N steps) C``."""
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if before is not None and after is not None:
        held = f"validation loss {before:.4f} -> {after:.4f} (start -> end)"
    elif after is not None:
        held = f"validation loss {after:.4f} at the end"
    else:
        held = "no validation loss (validation_fraction: 0)"
    smoothed, steps = metrics.get("train_loss_smoothed"), metrics.get("train_loss_smoothed_steps")
    if smoothed is None:
        return held
    return f"{held}; training loss (smoothed over last {steps} steps) {smoothed:.4f}"


def _metrics(
    cfg: BuiltinStageConfig,
    trainer,
    work: Path,
    tmp: Path,
    counts: tuple[int, int, int, int],
    final_eval: dict,
    resumed: Optional[str],
    name: Optional[str] = None,
) -> dict:
    """training_metrics.json; also writes losses.csv and losses.png into ``tmp``."""
    trainable, n_tokens, n_train, n_eval = counts
    history = list(trainer.state.log_history)
    initial = read_json(work / "initial_eval.json")
    if initial is not None:
        history.insert(0, {**initial, "step": 0})
    rows = loss_rows(history)
    write_losses(rows, tmp / "losses.csv")
    plotted = plot_losses(
        rows, tmp / "losses.png", f"{name}, stage '{cfg.stage}': loss" if name else f"{cfg.stage}: loss"
    )
    return {
        "stage": cfg.stage,
        "input": cfg.model,
        "tli_recipe_version": __version__,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "trainable_parameters": trainable,
        "lora": cfg.lora.model_dump() if cfg.lora else None,
        "tokens": n_tokens,
        "train_sequences": n_train,
        "validation_sequences": n_eval,
        "sequence_length": cfg.sequence_length,
        **loss_summary(rows, final_eval.get("eval_loss")),
        "eval_perplexity_after": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "resumed_from": Path(resumed).name if resumed else None,
        "plot": "losses.png" if plotted else None,
        # objective: mod: the logits come from the model with this head (tli_recipe.load_mod_model)
        "mod_head": "mod_head.safetensors" if (tmp / "mod_head.safetensors").is_file() else None,
        "train_seconds": next((h["train_runtime"] for h in history if "train_runtime" in h), None),
    }


# --- the loss history of a stage -------------------------------------------------------------------------


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


# --- the model card (README.md) of a trained stage, from its config and metrics ---------------------------


def _loss(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def stage_card(cfg, metrics: dict, plan: Optional[Plan]) -> str:
    """README.md of ``<model>-<stage>``: what was trained, on what, and how it went."""
    base = plan.sources[plan.base_model] if plan is not None else None
    # the model card's rule: a hub id, else the folder's name; never a path of this machine
    front = ["library_name: transformers", "pipeline_tag: text-generation", "tags: [tli-recipe, depth-up-scaling]"]
    if base is not None:
        front[:0] = base_model_lines(base)
    name = plan.name if plan is not None else cfg.stage
    what = (
        f"LoRA adapters (r={cfg.lora.r}, alpha={cfg.lora.alpha:g}) on {', '.join(cfg.lora.targets)} of output layers "
        f"{ranges(cfg.lora.layers)}, merged into the weights (the adapter is in `adapter/`)"
        if cfg.lora
        else f"the full weights of {len(cfg.trainable_parameters)} tensors"
    )
    args = cfg.training_arguments
    steps = f"{metrics['global_step']} optimizer steps"
    grown = (
        f"(grown from `{model_name(base)}` with {plan.totals.layers_before} -> {plan.totals.layers_after} layers)"
        if plan
        else ""
    )
    validation_sequences = metrics["validation_sequences"]
    warmup = args.get("warmup_steps", 0)
    plot_file = ", `losses.png`" if metrics.get("plot") else ""
    return (
        "---\n"
        + "\n".join(front)
        + f"""
---
# {name}: stage {cfg.index} of {cfg.stages}, '{cfg.stage}'

Trained by `tli-recipe train` ({metrics["tli_recipe_version"]}) from `{Path(cfg.model).name}`
{grown}.
Trained: {what}; {metrics["trainable_parameters"]:,} trainable parameters. Every other tensor is unchanged.

- Data: {metrics["tokens"]:,} tokens in {metrics["train_sequences"]} training and {validation_sequences} validation
  sequences of {metrics["sequence_length"]} tokens.
- Schedule: {steps}, learning rate {args.get("learning_rate")} ({args.get("lr_scheduler_type")}, {warmup} warmup
  steps), batch {args.get("per_device_train_batch_size")} x {args.get("gradient_accumulation_steps", 1)} per device.
- Validation loss: {_loss(metrics["eval_loss_before"])} -> {_loss(metrics["eval_loss_after"])} (start -> end);
  training loss {_loss(metrics.get("train_loss_smoothed"))} (mean of the last {metrics.get("train_loss_smoothed_steps")}
  steps).
- Files: `training_config.yaml` (the stage config), `training_metrics.json`, `losses.csv`{plot_file},
  `plan.json` (the grown checkpoint's plan).

The license is the base model's: copy its license and terms before you publish this checkpoint.
"""
    )
