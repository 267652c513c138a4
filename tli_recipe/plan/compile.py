"""compile_plan(recipe) -> Plan: pure data saying what every output tensor is made of.

The plan is computed from the recipe, the architecture definition, ``config.json``
and the safetensors headers; no tensor is read and torch is never imported. It is a short
sequence of named steps, each a function of its inputs:

1. ``resolve_sources``: open the checkpoints, build the stack of source layers (plan/sources.py);
2. ``build_layer_map``: the output layers, original and injected (plan/layers.py);
3. ``assign_tensor_ops``: one TensorOp per output tensor (plan/tensor_ops.py); with a ``widen``
   section, ``widen_ops`` then grows the widths (plan/widen.py); with an ``upcycle``
   section, ``upcycle_ops`` then turns the MLP of chosen output layers into experts (plan/upcycle.py);
4. ``rewrite_config``: the output config.json (plan/config.py);
5. ``resolve_stages``: training stages as layers and parameter names (plan/stages.py);
6. ``judge_preservation``: does the output compute exactly the base model's function?

Problems of independent steps are collected and raised together, each at its recipe line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tli_recipe._version import __version__
from tli_recipe.plan.config import rewrite_config
from tli_recipe.plan.layers import build_layer_map, check_injection
from tli_recipe.plan.model import (
    LayerEntry,
    LesaSettings,
    Plan,
    RecipeSpot,
    SourcePin,
    TensorOp,
    Totals,
    recipe_hash,
)
from tli_recipe.plan.ops import zero_effect
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.sources import Sources, resolve_sources
from tli_recipe.plan.stages import ops_by_layer, resolve_stages
from tli_recipe.plan.tensor_ops import (
    assign_tensor_ops,
    check_lora_targets,
    choose_policies,
)
from tli_recipe.plan.upcycle import (
    UpcycleConfig,
    check_expert_widths,
    check_moe_lora,
    check_output_tensors,
    resolve_upcycle,
    select_layers,
    upcycle_ops,
    upcycle_summary,
)
from tli_recipe.plan.widen import BothConfigs, resolve_widen, widen_ops
from tli_recipe.recipe.load import LoadedRecipe, Marks
from tli_recipe.recipe.schema import Recipe, projection_order
from tli_recipe.source.arch import ArchError, Architecture
from tli_recipe.source.checkpoint import numel
from tli_recipe.source.hub import Access

__all__ = [
    "compile_plan",
    "judge_preservation",
    "resolve_sources",
    "build_layer_map",
    "assign_tensor_ops",
    "rewrite_config",
    "resolve_stages",
]


def compile_plan(loaded: LoadedRecipe, access: Optional[Access] = None) -> Plan:
    """Compile a validated recipe into a Plan; every problem is reported at its recipe line.

    ``access`` says how far a hub id may be fetched (default: the local cache only, no request)."""
    recipe: Recipe = loaded.recipe
    problems = Problems(loaded)
    sources = resolve_sources(recipe, problems, access or Access())
    upc = resolve_upcycle(recipe, sources, problems) if not problems.items else None  # may add expert sources
    wid = resolve_widen(recipe, sources, problems) if not problems.items else None
    stack_ok = not problems.items  # the steps below need the whole stack
    arch = sources.arch
    out_arch = upc.arch if upc is not None else arch  # the architecture the output is written in
    # Problems of the init policies and LoRA targets do not stop the steps after them (an
    # unknown projection matches no tensor), so they are reported together with theirs.
    policies = choose_policies(recipe.inject, arch, problems)
    check_lora_targets(recipe, out_arch, problems)
    if not stack_ok:
        problems.raise_if_any()
    label = f" of {recipe.base_model}" if recipe.slices is None else ""
    if not check_injection(recipe.inject, len(sources.stack), sources.base_layers, label, problems):
        problems.raise_if_any()
    layers, warnings = build_layer_map(sources.stack, recipe.inject)
    ops, op_warnings = assign_tensor_ops(recipe, sources, layers, policies, problems)
    if wid is not None:
        ops = widen_ops(recipe, sources, ops, wid, problems)
    out_dtype = recipe.dtype or sources.models[sources.base].dtype or "float32"
    moe = None
    if upc is not None:
        select_layers(upc, layers, problems)
        widths = wid.plan.config if wid is not None else arch.names(sources.configs[sources.base])
        ops = upcycle_ops(recipe, sources, layers, ops, upc, problems, hidden=widths.get("hidden_size"))
        check_expert_widths(recipe, widths, arch.names(sources.configs[sources.base]), out_dtype, problems)
        moe = UpcycleConfig(upc, len(layers), widths.get("intermediate_size"))
        if wid is not None:
            moe = BothConfigs(moe, wid)
    injected = [e.output for e in layers if e.role == "injected"]
    config, changes, blocking, config_warnings = rewrite_config(
        sources.base_config,
        sources.configs,
        arch,
        layers,
        injected,
        out_dtype,
        recipe.output_config,
        sources.where,
        problems,
        moe if moe is not None else wid,
    )
    if upc is not None and not problems.items:  # a safety net over an otherwise sound plan
        check_output_tensors(upc, ops, config, len(layers), problems)
    stage_warnings: list[str] = []
    stages = resolve_stages(recipe, problems, layers, ops, out_arch, stage_warnings)
    if upc is not None:
        check_moe_lora(recipe, upc, stages, problems)
    problems.raise_if_any()
    preserving = judge_preservation(sources, layers, ops)
    upcycled = upcycle_summary(upc, ops, config, identity_layers(layers, ops, arch)) if upc is not None else None
    preserving = preserving and not (upcycled and upcycled.breaks_preservation)
    name = recipe.name or Path(loaded.file).stem
    recipe_dict = loaded.resolved()
    base_tensors = sources.tensors[sources.base]
    totals = Totals(
        layers_before=sources.base_layers,
        layers_after=len(layers),
        parameters_before=sum(numel(s) for _, s in base_tensors.values()),
        parameters_after=sum(numel(op.shape) for op in ops),
        bytes_to_write=sum(op.nbytes for op in ops),
        tensors=len(ops),
    )
    return Plan(
        tli_recipe_version=__version__,
        name=name,
        recipe_file=str(loaded.file),
        recipe_sha256=recipe_hash(recipe_dict),
        recipe=recipe_dict,
        architecture=arch.name,
        layer_prefix=arch.layer_prefix,
        base_model=recipe.base_model,
        sources=sources.models,
        dtype=out_dtype,
        layers=layers,
        requires_grad_layers=injected,
        init={p: str(policies[p]) for p in sorted(policies, key=projection_order)},
        init_recommended={p: arch.recommended_init[p] for p in sorted(arch.recommended_init, key=projection_order)},
        identity_options={
            b: [", ".join(f"{p}={k}" for p, k in o.items()) for o in opts] for b, opts in arch.identity_branches.items()
        },
        function_preserving=preserving,
        tensors=ops,
        config=config,
        upcycle=upcycled,
        widen=wid.plan if wid is not None else None,
        config_changes=changes,
        blocking=blocking,
        stages=stages,
        warnings=sources.warnings + warnings + op_warnings + config_warnings + stage_warnings,
        totals=totals,
        output=recipe.output or f"out/{name}",
        shard_size=recipe.shard_size,
        seed=recipe.seed,
        lesa=LesaSettings(**recipe.inject.lesa.model_dump()) if any(op.op == "lesa" for op in ops) else None,
        recipe_dtype=recipe.dtype,
        pins=source_pins(recipe, loaded.marks, sources),
        layers_pattern=arch.layers_pattern,
        num_layers_key=arch.num_layers_key,
        vocab_key=arch.vocab_key,
        vocab_size=_vocab_size(arch, sources.configs[sources.base]),
        decoder_config_path=list(arch.config_path),
    )


def _vocab_size(arch: Architecture, decoder: dict) -> Optional[int]:
    try:
        value = arch.names(decoder).get(arch.vocab_key)
    except (KeyError, ArchError):  # a default over a key this config lacks
        value = decoder.get(arch.vocab_key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def recipe_spot(marks: Marks, path: tuple) -> RecipeSpot:
    """Where ``path`` was written (its value and its key), from the recipe's own marks."""
    file, line, column = marks.locate(path)
    _, key_line, key_column = marks.locate(path, prefer_key=True)
    return RecipeSpot(path=path, file=file, line=line, column=column, key_line=key_line, key_column=key_column)


def source_pins(recipe: Recipe, marks: Marks, sources: Sources) -> dict[str, SourcePin]:
    """Each source's pin (revision, checksums) with the recipe location of each entry, from the
    recipe's own marks: right for --set overrides and rendered recipes, never re-read later."""
    refs = [(recipe.base_model, ("base_model",))]
    refs += [
        (piece.model, ("slices", i, "model")) for i, piece in enumerate(recipe.slices or []) if piece.model is not None
    ]
    refs += [
        (entry.model, ("upcycle", "sources", i, "model"))
        for i, entry in enumerate(recipe.upcycle.sources or [] if recipe.upcycle else [])
    ]
    pins: dict[str, SourcePin] = {}
    for ref, path in refs:
        key = str(ref)
        if key in pins or key not in sources.models:
            continue
        pins[key] = SourcePin(
            revision=ref.revision,
            checksums=dict(ref.checksums),
            revision_at=recipe_spot(marks, path + ("revision",)),
            checksums_at={file: recipe_spot(marks, path + ("checksums", file)) for file in ref.checksums},
        )
    return pins


def judge_preservation(sources: Sources, layers: list[LayerEntry], ops: list[TensorOp]) -> bool:
    """True when the output computes exactly the base model's function: the stack is the base
    model's layers in order, and every injected layer adds nothing to the residual stream."""
    stack = [(e.source, e.layer) for e in layers if e.role == "original"]
    if stack != [(sources.base, i) for i in range(sources.base_layers)]:
        return False
    by_layer = ops_by_layer(ops)
    return all(_is_identity(by_layer.get(e.output, []), sources.arch) for e in layers if e.role == "injected")


def identity_layers(layers: list[LayerEntry], ops: list[TensorOp], arch: Architecture) -> set[int]:
    """The injected output layers that add nothing to the residual stream."""
    by_layer = ops_by_layer(ops)
    return {e.output for e in layers if e.role == "injected" and _is_identity(by_layer.get(e.output, []), arch)}


def _is_identity(layer_ops: list[TensorOp], arch: Architecture) -> bool:
    """True when an injected layer (its ops) adds nothing to the residual stream: each residual
    branch of the architecture has one option whose projections all have an effective value of
    exactly 0 (the op table says which ops write zeros; a norm stored as offset + w is at 0
    when filled with -offset)."""
    by_projection: dict[str, list[TensorOp]] = {}
    for op in layer_ops:
        by_projection.setdefault(op.projection, []).append(op)

    def exact(proj: str) -> bool:
        tensors = by_projection.get(proj, [])
        return bool(tensors) and all(
            zero_effect(op, arch.offset_of(proj) if proj in arch.projections else 0.0) for op in tensors
        )

    return bool(arch.identity_branches) and all(
        any(all(exact(p) for p in option) for option in options) for options in arch.identity_branches.values()
    )
