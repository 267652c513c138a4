"""The model card (README.md) of a trained stage's output, from its config and metrics. No torch."""

from __future__ import annotations

from typing import Optional

from tli_recipe.plan.model import Plan
from tli_recipe.plan.report import ranges
from tli_recipe.recipe.sources import is_hub_id


def _loss(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def stage_card(cfg, metrics: dict, plan: Optional[Plan]) -> str:
    """README.md of ``<model>-<stage>``: what was trained, on what, and how it went."""
    base = plan.sources[plan.base_model] if plan is not None else None
    front = ["library_name: transformers", "pipeline_tag: text-generation", "tags: [tli-recipe, depth-up-scaling]"]
    if base is not None and is_hub_id(base.ref) and base.ref != base.path:
        front[:0] = [f"base_model: {base.ref}", "base_model_relation: finetune"]
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
        f"(grown from `{plan.base_model}` with {plan.totals.layers_before} -> {plan.totals.layers_after} layers)"
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

Trained by `tli-recipe train` ({metrics["tli_recipe_version"]}) from `{cfg.model}`
{grown}.
Trained: {what}; {metrics["trainable_parameters"]:,} trainable parameters. Every other tensor is unchanged.

- Data: {metrics["tokens"]:,} tokens in {metrics["train_sequences"]} training and {validation_sequences} validation
  sequences of {metrics["sequence_length"]} tokens.
- Schedule: {steps}, learning rate {args.get("learning_rate")} ({args.get("lr_scheduler_type")}, {warmup} warmup
  steps), batch {args.get("per_device_train_batch_size")} x {args.get("gradient_accumulation_steps", 1)} per device.
- Training loss: {_loss(metrics["train_loss_first"])} -> {_loss(metrics["train_loss_last"])};
  validation loss: {_loss(metrics["eval_loss_before"])} -> {_loss(metrics["eval_loss_after"])}.
- Files: `training_config.yaml` (the stage config), `training_metrics.json`, `losses.csv`{plot_file},
  `plan.json` (the grown checkpoint's plan).

The license is the base model's: copy its license and terms before you publish this checkpoint.
"""
    )
