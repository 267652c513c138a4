"""Step 5 of compile_plan: training stages resolved against the output model (trainable layers,
parameters, LoRA). The work is linear in the number of output tensors: ops are grouped by
layer once, and each stage looks its layers up."""

from __future__ import annotations

from typing import Iterable, Optional

from tli_recipe.plan.model import (
    DistributedPlan,
    LayerEntry,
    LoraPlan,
    ModPlan,
    StagePlan,
    StageSettings,
    TensorOp,
)
from tli_recipe.plan.ops import zero_effect
from tli_recipe.plan.problems import Problems
from tli_recipe.recipe.schema import MOE_GROUPS, LayerSpan, Mod, Recipe, Stage
from tli_recipe.source.arch import Architecture
from tli_recipe.source.checkpoint import numel


def ops_by_layer(ops: Iterable[TensorOp]) -> dict[Optional[int], list[TensorOp]]:
    """Output layer -> its TensorOps (None: the tensors outside the decoder layers), in plan order."""
    grouped: dict[Optional[int], list[TensorOp]] = {}
    for op in ops:
        grouped.setdefault(op.layer, []).append(op)
    return grouped


def _zeroed(op: TensorOp, arch: Optional[Architecture]) -> bool:
    offset = arch.offset_of(op.projection) if arch is not None and op.projection in arch.projections else None
    return op.projection is not None and zero_effect(op, offset)


def zeroed_projections(
    by_layer: dict[Optional[int], list[TensorOp]], injected: list[int], arch: Optional[Architecture] = None
) -> set[str]:
    """Projections at an effective exact zero in the injected layers, judged from the ops themselves."""
    return {op.projection for layer in injected for op in by_layer.get(layer, ()) if _zeroed(op, arch)}


def _selected(stage: Stage, i: int, layers: list[LayerEntry], problems: Problems) -> tuple[set[int], set[str]]:
    """The output layers and non-layer groups a stage's trainable selectors choose."""
    chosen: set[int] = set()
    groups: set[str] = set()
    for j, sel in enumerate(stage.trainable):
        if isinstance(sel, LayerSpan):
            start, end = sel.layers
            if end > len(layers):
                n_injected = sum(e.role == "injected" for e in layers)
                problems.add(
                    ("stages", i, "trainable", j, "layers"),
                    f"[{start}, {end}] ends past the {len(layers)} output layers ({len(layers) - n_injected} "
                    f"original + {n_injected} injected); expected end <= {len(layers)}",
                )
            chosen |= set(range(start, min(end, len(layers))))
        elif sel == "all":
            chosen |= {e.output for e in layers}
            if stage.lora is None:  # a full stage trains everything; LoRA adapts the layers
                groups |= {"embeddings", "head"}
        elif sel in ("injected", "original"):
            chosen |= {e.output for e in layers if e.role == sel}
        else:
            groups.add(sel)
    return chosen, groups


def _moe_ops(
    stage: Stage,
    i: int,
    groups: set[str],
    by_layer: dict[Optional[int], list[TensorOp]],
    arch: Architecture,
    problems: Problems,
) -> tuple[list[TensorOp], bool]:
    """The tensors of the MoE groups a stage names (every router, every expert, in any layer that has
    them), and whether a problem was reported."""
    found, before = [], len(problems.items)
    for j, sel in enumerate(stage.trainable):
        if sel not in MOE_GROUPS:
            continue
        if sel == "shared":
            problems.add(
                ("stages", i, "trainable", j),
                f"the {arch.name} architecture has no shared experts; expected router or experts",
            )
            continue
        picked = [op for layer, ops in by_layer.items() if layer is not None for op in ops if _in_group(op, sel, arch)]
        if not picked:
            problems.add(
                ("stages", i, "trainable", j),
                f"'{sel}' selects nothing: the output has no MoE layers; add an upcycle section or pick another group",
            )
        elif stage.lora is not None:
            problems.add(
                ("stages", i, "trainable", j),
                f"LoRA adapts linear modules, and '{sel}' tensors are plain "
                "parameters to transformers; expected a stage without lora",
            )
        found += picked
    return found, len(problems.items) > before


def _in_group(op: TensorOp, group: str, arch: Architecture) -> bool:
    if group == "router":
        return op.projection == "router"
    split = arch.split_layer_key(op.name)
    return op.expert is not None or (split is not None and arch.is_expert_tensor(split[1]))


def resolve_stage(
    stage: Stage,
    i: int,
    layers: list[LayerEntry],
    by_layer: dict[Optional[int], list[TensorOp]],
    arch: Architecture,
    earlier: list[StagePlan],
    problems: Problems,
    warnings: list[str],
) -> StagePlan:
    """One stage: its trainable layers, the names and element count of what trains, its LoRA."""
    chosen, groups = _selected(stage, i, layers, problems)
    moe, moe_problem = _moe_ops(stage, i, groups, by_layer, arch, problems)
    layer_ops = [op for layer in sorted(chosen) for op in by_layer.get(layer, ())]
    if moe:  # in plan order, each tensor once
        picked = {op.name for op in layer_ops} | {op.name for op in moe}
        layer_ops = [op for layer, ops in by_layer.items() if layer is not None for op in ops if op.name in picked]
    lora = None
    if stage.lora is None:
        groups_of = {name: spec.get("group") for name, spec in arch.tensors.items()}
        trained = layer_ops + [op for op in by_layer.get(None, ()) if groups_of.get(op.name) in groups]
    else:
        targets = set(stage.lora.targets)
        trained = [op for op in layer_ops if op.projection in targets and op.name.endswith(".weight")]
        for j, sel in enumerate(stage.trainable):
            if sel in ("embeddings", "head"):
                problems.add(
                    ("stages", i, "trainable", j),
                    f"LoRA adapts linear layers only; '{sel}' cannot get adapters; expected layer groups "
                    "(injected, original, all, {layers: [start, end]}) in a LoRA stage, or a stage without lora",
                )
        injected = [e.output for e in layers if e.role == "injected"]
        # Judged once, here, and stored in the plan: emit and train read it (allow_frozen_injected can
        # still change with `--set` on a grown checkpoint; the layers and targets cannot).
        stuck, missing = _unmoved(earlier, chosen, targets, by_layer, injected, arch)
        if stuck and not stage.lora.allow_frozen_injected:
            warnings.append(
                f"stage '{stage.name}': LoRA targets leave out {', '.join(missing)}, which are zero in the "
                f"injected layers {stuck}; adapters on the other projections of those layers get no "
                "gradient through a zero output, so the injected layers never move; `train` and `emit` "
                "refuse this stage unless lora.allow_frozen_injected is true"
            )
        lora = LoraPlan(
            r=stage.lora.r,
            alpha=stage.lora.alpha,
            dropout=stage.lora.dropout,
            targets=list(stage.lora.targets),
            layers=sorted(chosen),
            frozen_injected=stuck,
            frozen_by=missing,
        )
    # LoRA targets the architecture lacks are reported by check_lora_targets; an empty
    # selection that follows from them is not a second problem.
    unknown_targets = stage.lora is not None and any(t not in arch.projections for t in stage.lora.targets)
    if not trained and not unknown_targets and not moe_problem:
        problems.add(
            ("stages", i, "trainable"), "selects no parameter of the output model; expected at least one layer"
        )
    mod = _mod_plan(stage, i, layers, by_layer, arch, problems)
    distributed, why = resolve_distributed(stage)
    if why:
        problems.add(("stages", i, "distributed"), why)
    return StagePlan(
        name=stage.name,
        trainable_layers=sorted(chosen),
        trainable_groups=sorted(groups),
        parameters=[op.name for op in trained],
        lora=lora,
        mod=mod,
        trainable_parameters=trainable_count(trained, stage.lora.r if stage.lora else None)
        + (mod.head_parameters if mod else 0),
        distributed=distributed,
        settings=StageSettings.of(stage),
    )


def resolve_distributed(stage: Stage) -> tuple[DistributedPlan, Optional[str]]:
    """The stage's ``distributed`` setting with its defaults (ZeRO stage 3), and why it cannot work, or None.

    FSDP2 shards each parameter on its own, so a stage may train any part of a wrapped decoder layer (FSDP1's
    flat parameters would need each layer all-frozen or all-trainable); ZeRO 2 and 3 keep no optimizer state
    for frozen parameters. What cannot work is a QLoRA base sharded: the built-in trainer places the 4- or
    8-bit weights on each process's GPU itself (bitsandbytes), which FSDP and ZeRO-3 would have to own."""
    d = stage.distributed
    plan = DistributedPlan(
        strategy=d.strategy,
        zero_stage=(d.zero_stage or 3) if d.strategy == "deepspeed" else None,
        offload=d.offload,
    )
    sharded = plan.strategy == "fsdp" or plan.zero_stage == 3
    if sharded and stage.lora is not None and stage.lora.quantize:
        what = "fsdp" if plan.strategy == "fsdp" else "deepspeed with zero_stage 3"
        return plan, (
            f"{what} shards the parameters, and lora.quantize ({stage.lora.quantize}-bit QLoRA) loads the quantized "
            "base on each process's GPU; expected strategy ddp, or deepspeed with zero_stage: 2 (or no quantize)"
        )
    if plan.zero_stage == 3 and stage.objective == "mod":
        return plan, (
            "deepspeed with zero_stage 3 partitions the MoD head's parameters too, and the built-in trainer saves "
            "the head from the model as one process holds it; expected zero_stage: 2, or strategy fsdp or ddp"
        )
    return plan, None


def _mod_plan(
    stage: Stage,
    i: int,
    layers: list[LayerEntry],
    by_layer: dict[Optional[int], list[TensorOp]],
    arch: Architecture,
    problems: Problems,
) -> Optional[ModPlan]:
    """objective: mod: the last ``k`` output layers as exits; the head's size from the embedding width."""
    if stage.objective != "mod":
        return None
    settings = stage.mod or Mod()
    k = settings.layers
    if k > len(layers):
        problems.add(
            ("stages", i, "mod", "layers") if stage.mod else ("stages", i, "objective"),
            f"an ensemble of the last {k} layers needs at least {k} layers; the output has {len(layers)}; "
            f"expected mod.layers between 2 and {len(layers)}",
        )
        return None
    embeddings = [op for op in by_layer.get(None, ()) if arch.tensors.get(op.name, {}).get("group") == "embeddings"]
    hidden = embeddings[0].shape[-1] if embeddings else 0
    return ModPlan(
        layers=[e.output for e in layers[-k:]],
        hidden_size=hidden,
        head_parameters=k * hidden + hidden * k + k + 1,
        distill_weight=settings.distill_weight,
        init=settings.init,
        learning_rate=settings.learning_rate,
    )


def trainable_count(trained: list[TensorOp], lora_r: Optional[int]) -> int:
    """Elements that train: the tensors themselves, or with LoRA r*(in + out) per adapted [out, in] weight (A and B)."""
    if lora_r is None:
        return sum(numel(op.shape) for op in trained)
    return sum(lora_r * (op.shape[0] + op.shape[1]) for op in trained if len(op.shape) == 2)


def _unmoved(
    earlier: list[StagePlan],
    chosen: set[int],
    targets: set[str],
    by_layer: dict[Optional[int], list[TensorOp]],
    injected: list[int],
    arch: Optional[Architecture],
) -> tuple[list[int], list[str]]:
    missing = sorted(zeroed_projections(by_layer, injected, arch) - targets)
    if not missing:
        return [], []
    trained = {name for stage in earlier if stage.lora is None for name in stage.parameters}
    stuck = [
        layer
        for layer in injected
        if layer in chosen
        and (names := [op.name for op in by_layer.get(layer, ()) if op.projection in missing and _zeroed(op, arch)])
        and not all(name in trained for name in names)
    ]
    return stuck, (missing if stuck else [])


def resolve_stages(
    recipe: Recipe,
    problems: Problems,
    layers: list[LayerEntry],
    ops: list[TensorOp],
    arch: Architecture,
    warnings: list[str],
) -> list[StagePlan]:
    by_layer = ops_by_layer(ops)
    stages: list[StagePlan] = []
    for i, stage in enumerate(recipe.stages):
        stages.append(resolve_stage(stage, i, layers, by_layer, arch, stages, problems, warnings))
    return stages
