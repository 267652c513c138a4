"""The model card (README.md) of a grown checkpoint, from its Plan."""

from __future__ import annotations

from tli_recipe.plan.model import Plan
from tli_recipe.plan.report import ranges
from tli_recipe.recipe.sources import is_hub_id


def _front_matter(plan: Plan) -> str:
    """The card's YAML header: ``base_model`` only when the base is a hub id (a local path means
    nothing on the hub and would publish a directory name of this machine)."""
    base = plan.sources[plan.base_model]
    lines = ["library_name: transformers", "pipeline_tag: text-generation", "tags: [tli-recipe, depth-up-scaling]"]
    if is_hub_id(base.ref) and base.ref != base.path:
        lines[:0] = [f"base_model: {base.ref}", "base_model_relation: finetune"]
    return "---\n" + "\n".join(lines) + "\n---\n"


def model_card(plan: Plan) -> str:
    """README.md of an output checkpoint."""
    t = plan.totals
    stages = (
        "\n".join(_stage_line(i, s) for i, s in enumerate(plan.stages, 1))
        or "The recipe defines no training stages. The paper's schedule: first train only the injected layers "
        f"({plan.requires_grad_layers}), then the whole model (often with LoRA)."
    )
    parameters = f"{t.parameters_before:,} -> {t.parameters_after:,}"
    preserving = (
        "yes, the model computes exactly what the base model computes"
        if plan.function_preserving
        else "no: it differs from the base model until trained"
    )
    return (
        _front_matter(plan)
        + f"""# {plan.name}

Grown from `{plan.base_model}` ({plan.architecture}) by tli-recipe {plan.tli_recipe_version}:
{t.layers_before} -> {t.layers_after} decoder layers, {parameters} parameters, {plan.dtype}.

- Injected layers (output indices, also `requires_grad_layers` in config.json): {plan.requires_grad_layers or "none"}
- Init of the injected layers: {", ".join(f"{k}={v}" for k, v in plan.init.items()) or "n/a"}; other tensors copied.
{_upcycle_line(plan)}- Function-preserving: {preserving}.
- Recipe: `recipe.yaml` (resolved), sha256 `{plan.recipe_sha256}`; full plan: `plan.json`.

## Layer map

| output | source layer | role |
|---|---|---|
"""
        + "\n".join(f"| {e.output} | {e.source}:{e.layer} | {e.role} |" for e in plan.layers)
        + f"""

## Training next

{stages}

Check the checkpoint against its base model: `tli-recipe verify {plan.output}`.

The license is the base model's: copy its license and terms before you publish this checkpoint.
"""
        + _provenance(plan)
    )


def _stage_line(i: int, s) -> str:
    trains = "LoRA adapters (r=" + str(s.lora.r) + ") on " + ", ".join(s.lora.targets) if s.lora else "the full weights"
    groups = " and " + ", ".join(s.trainable_groups) if s.trainable_groups else ""
    return (
        f"{i}. **{s.name}**: trains {trains} "
        f"of output layers {ranges(s.trainable_layers)}{groups} "
        f"({s.trainable_parameters:,} parameters)."
    )


def _upcycle_line(plan: Plan) -> str:
    up = plan.upcycle
    if up is None:
        return ""
    return (
        f"- Sparsely upcycled to {up.output_architecture} (arXiv 2212.05055): output layers {ranges(up.layers)} hold "
        f"{up.experts} experts each, {up.top_k} active per token, router {up.router}; "
        f"{up.parameters_total:,} parameters, {up.parameters_active:,} active per token. Router loss: "
        + ", ".join(f"`{k}: {v}`" for k, v in up.aux_loss.items())
        + " in config.json.\n"
    )


def _provenance(plan: Plan) -> str:
    """The model card's record of what the output was made from (filled by `run`)."""
    lines = [
        "",
        "## Provenance",
        "",
        f"Made by tli-recipe {plan.tli_recipe_version} from the recipe with sha256 `{plan.recipe_sha256}`.",
        "",
    ]
    for key, src in plan.sources.items():
        lines.append(
            f"- `{key}`: revision `{src.revision or 'unknown'}`, {len(plan.source_files.get(key, {}))} files hashed"
        )
    rows = [
        f"| `{key}` | {name} | `{digest}` |"
        for key, files in plan.source_files.items()
        for name, digest in files.items()
    ]
    if rows:
        lines += ["", "| source | file | sha256 |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"
