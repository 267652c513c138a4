"""The model card (README.md) of a grown checkpoint, from its Plan."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Optional

from tli_recipe.plan.model import Plan
from tli_recipe.plan.report import describe_ops, is_hub_source, ranges, summarize
from tli_recipe.plan.stages import ops_by_layer
from tli_recipe.recipe.sources import is_hub_id


def hub_id(src) -> Optional[str]:
    """The hub id of a source model: the id the recipe wrote, or the one its folder is a Hugging Face cache
    snapshot of (``models--org--name/snapshots/<commit>``); None for any other local folder."""
    if is_hub_id(src.ref) and src.ref != src.path and is_hub_source(src):
        return src.ref
    parts = PurePosixPath(src.path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org, _, name = parts[-3][len("models--") :].partition("--")
        if is_hub_id(f"{org}/{name}"):
            return f"{org}/{name}"
    return None


def model_name(src) -> str:
    """How the card names a source model: its hub id, else its folder's name (never a path of this machine)."""
    return hub_id(src) or PurePosixPath(src.path).name


def base_model_lines(src) -> list[str]:
    """The front matter's ``base_model`` lines for a source model, in every card (the model's and each trained
    stage's): ``base_model`` and ``base_model_relation`` when it has a hub id (the hub accepts nothing else
    there); for a local folder a comment naming the folder (never its path) and saying to set them."""
    hub = hub_id(src)
    if hub:
        return [f"base_model: {hub}", "base_model_relation: finetune"]
    return [
        f"# base_model: the hub id of {model_name(src)} (a local folder here), if it has one: set it, with",
        "# base_model_relation: finetune, before publishing",
    ]


def _front_matter(plan: Plan) -> str:
    """The card's YAML header, as the Hugging Face hub reads it: ``base_model`` only when the base is a hub
    id (the hub accepts nothing else there, and a path would publish a directory of this machine); for a
    local folder a comment says to set it."""
    base = plan.sources[plan.base_model]
    tags = ["tli-recipe", "depth-up-scaling"]
    if plan.requires_grad_layers:
        tags.append("transformer-layer-injection")
    if plan.upcycle is not None:
        tags.append("mixture-of-experts")
    if plan.widen is not None:
        tags.append("width-growth")
    lines = (
        base_model_lines(base)
        + ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
        + [f"- {t}" for t in tags]
    )
    return "---\n" + "\n".join(lines) + "\n---\n"


def model_card(plan: Plan) -> str:
    """README.md of an output checkpoint: what it is, its layer map, and the commands to check and train
    it, run from its own folder (the card moves with the checkpoint)."""
    t = plan.totals
    base = plan.sources[plan.base_model]
    parameters = f"{t.parameters_before:,} -> {t.parameters_after:,}"
    preserving = (
        "yes, the model computes exactly what the base model computes"
        if plan.function_preserving
        else "no: it differs from the base model until trained"
    )
    injected = summarize(plan.requires_grad_layers) if plan.requires_grad_layers else "none"
    return (
        _front_matter(plan)
        + f"""# {plan.name}

Grown from `{model_name(base)}` ({plan.architecture}) by tli-recipe {plan.tli_recipe_version}:
{t.layers_before} -> {t.layers_after} decoder layers, {parameters} parameters, {plan.dtype}.

- Injected layers (output indices, also `requires_grad_layers` in config.json): {injected}
- Init of the injected layers: {", ".join(f"{k}={v}" for k, v in plan.init.items()) or "n/a"}; other tensors copied.
{_widen_line(plan)}{_upcycle_line(plan)}- Function-preserving: {preserving}.
- Recipe: `recipe.yaml` (resolved), sha256 `{plan.recipe_sha256}`; full plan: `plan.json`.

## Layer map

{_layer_map(plan)}

## Check and train

{_commands(plan)}

The license is the base model's: copy its license and terms before you publish this checkpoint.
"""
        + _provenance(plan)
    )


#: A layer map longer than this many rows shows its first and last rows (plan.json has every layer).
MAP_ROWS = 40


def _layer_map(plan: Plan) -> str:
    """The layer map as runs: consecutive output layers copying consecutive layers of one source with the
    same role, slice and policy are one row."""
    by_layer = ops_by_layer(plan.tensors)
    names = {key: model_name(src) for key, src in plan.sources.items()}
    runs: list[list] = []  # [first output, last output, source key, first layer, last layer, role, slice, policy]
    for e in plan.layers:
        policy = describe_ops(by_layer.get(e.output, []))
        last = runs[-1] if runs else None
        if (
            last is not None
            and e.output == last[1] + 1
            and (e.source, e.role, e.slice, policy) == (last[2], last[5], last[6], last[7])
            and e.layer == last[4] + 1
        ):
            last[1], last[4] = e.output, e.layer
        else:
            runs.append([e.output, e.output, e.source, e.layer, e.layer, e.role, e.slice, policy])
    slices = any(r[6] is not None for r in runs)
    multi = len(plan.sources) > 1
    header = ["output layers", "source layers", "role"] + (["slice"] if slices else []) + ["init"]
    rows = []
    for first, last, source, a, b, role, slice_, policy in runs:
        span = lambda x, y: f"{x}" if x == y else f"{x}-{y}"  # noqa: E731
        cells = [span(first, last), (f"{names[source]} " if multi else "") + span(a, b), role]
        cells += [str(slice_) if slice_ is not None else ""] if slices else []
        rows.append("| " + " | ".join(cells + [policy]) + " |")
    if len(rows) > MAP_ROWS:
        hidden = len(rows) - MAP_ROWS
        gap = "| ... | " + " | ".join([f"{hidden} more rows: see plan.json"] + [""] * (len(header) - 2)) + " |"
        rows = rows[: MAP_ROWS - 8] + [gap] + rows[-8:]
    note = (
        "Ranges are inclusive; layer indices are 0-based"
        + (f"; source layers are of `{model_name(plan.sources[plan.base_model])}`" if not multi else "")
        + "."
    )
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, "", note])


def _commands(plan: Plan) -> str:
    """The exact commands to verify the checkpoint and train each stage, run from its folder."""
    lines = [
        "Run these from this folder (the one holding this README and plan.json):",
        "",
        "```sh",
        "tli-recipe verify .    # tensors against plan.json, logits against the base model",
    ]
    needs_data = False
    for i, s in enumerate(plan.stages, 1):
        data = "" if s.settings.datasets else " --data train.txt"
        needs_data = needs_data or bool(data)
        lines.append(f"tli-recipe train . --stage {s.name}{data}    # stage {i}")
    lines.append("```")
    if plan.stages:
        lines += ["", "The stages, in order:", ""] + [_stage_line(i, s) for i, s in enumerate(plan.stages, 1)]
        if needs_data:
            lines += [
                "",
                "`train.txt` is your training text: plain text with one document per line, or JSONL of "
                '`{"text": ...}`, chat `{"messages": [...]}` or `{"instruction", "input", "output"}` records.',
            ]
        lines += [
            "",
            "Each stage's config for Axolotl and LLaMA-Factory is in `training/axolotl/` and "
            "`training/llamafactory/` (their README.txt gives the commands; a stage a trainer cannot express "
            "exactly has a `.refused.txt` saying why).",
        ]
    else:
        lines += [
            "",
            "The recipe defines no training stages. The paper's schedule: first train only the injected layers "
            f"({injected_or_none(plan)}), then the whole model (often with LoRA); add `stages` to the recipe "
            "and run it again, or `tli-recipe train . --data train.txt` trains the whole model.",
        ]
    return "\n".join(lines)


def injected_or_none(plan: Plan) -> str:
    return summarize(plan.requires_grad_layers) if plan.requires_grad_layers else "none here"


def _stage_line(i: int, s) -> str:
    trains = "LoRA adapters (r=" + str(s.lora.r) + ") on " + ", ".join(s.lora.targets) if s.lora else "the full weights"
    groups = " and " + ", ".join(s.trainable_groups) if s.trainable_groups else ""
    return (
        f"{i}. **{s.name}**: trains {trains} "
        f"of output layers {ranges(s.trainable_layers)}{groups} "
        f"({s.trainable_parameters:,} parameters)."
    )


def _widen_line(plan: Plan) -> str:
    w = plan.widen
    if w is None:
        return ""
    grown = [f"{k} {w.before[k]} -> {v}" for k, v in w.config.items() if k != "head_dim" and w.before[k] != v]
    return (
        f"- Widened (docs/widen.md of tli-recipe; init {w.init}, noise {w.noise:g}): "
        f"{', '.join(grown) or 'no width grows'}; head_dim {w.config['head_dim']}.\n"
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
            f"- `{model_name(src)}`: revision `{src.revision or 'unknown'}`, "
            f"{len(plan.source_files.get(key, {}))} files hashed"
        )
    rows = [
        f"| `{model_name(plan.sources[key]) if key in plan.sources else key}` | {name} | `{digest}` |"
        for key, files in plan.source_files.items()
        for name, digest in files.items()
    ]
    if rows:
        lines += ["", "| source | file | sha256 |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"
