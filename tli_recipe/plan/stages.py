"""Training stages resolved against the output model: trainable layers, parameters, LoRA.
"""

from __future__ import annotations

from tli_recipe.plan.model import LayerEntry, LoraPlan, StagePlan, TensorOp
from tli_recipe.plan.problems import Problems
from tli_recipe.recipe.schema import LayerSpan, Policy, Recipe
from tli_recipe.source.arch import Architecture
from tli_recipe.source.checkpoint import numel

ZERO_INIT = ("zero", "zero_gain", "scale(0)")


def unmoved_injected(earlier: list["StagePlan"], lora_layers: list[int], targets: list[str], ops: list[TensorOp],
                     init: dict[str, str], injected: list[int]) -> tuple[list[int], list[str]]:
    """Injected layers that a LoRA stage can never move, and the zeroed projections its targets leave out.

    In an injected layer whose output projections (or output norm gains) are zero, the block
    outputs exactly 0 and adapters on its other projections get no gradient (METHODS.md
    section 3). A layer whose zeroed tensors an earlier full-weight stage trained is no
    longer zero, so it is not counted.
    """
    zeroed = sorted(p for p, policy in init.items() if policy in ZERO_INIT)
    missing = [p for p in zeroed if p not in targets]
    if not missing:
        return [], []
    trained = {name for stage in earlier if stage.lora is None for name in stage.parameters}
    stuck = []
    for layer in injected:
        if layer in lora_layers:
            names = [op.name for op in ops if op.layer == layer and op.projection in missing]
            if names and not all(name in trained for name in names):
                stuck.append(layer)
    return stuck, (missing if stuck else [])


def resolve_stages(recipe: Recipe, problems: Problems, layers: list[LayerEntry], ops: list[TensorOp],
                    arch: Architecture, policies: dict[str, Policy], warnings: list[str]) -> list[StagePlan]:
    groups_of = {name: spec.get("group") for name, spec in arch.tensors.items()}
    stages = []
    for i, stage in enumerate(recipe.stages):
        chosen: set[int] = set()
        groups: set[str] = set()
        for j, sel in enumerate(stage.trainable):
            if isinstance(sel, LayerSpan):
                start, end = sel.layers
                if end > len(layers):
                    n_injected = sum(e.role == "injected" for e in layers)
                    problems.add(("stages", i, "trainable", j, "layers"),
                                 f"[{start}, {end}] ends past the {len(layers)} output layers ({len(layers) - n_injected} "
                                 f"original + {n_injected} injected); expected end <= {len(layers)}")
                chosen |= set(range(start, min(end, len(layers))))
            elif sel == "all":
                chosen |= {e.output for e in layers}
                if stage.lora is None:  # a full stage trains everything; LoRA adapts the layers
                    groups |= {"embeddings", "head"}
            elif sel in ("injected", "original"):
                chosen |= {e.output for e in layers if e.role == sel}
            else:
                groups.add(sel)
        layer_ops = [op for op in ops if op.layer in chosen]
        if stage.lora is None:
            params = [op.name for op in layer_ops] + [op.name for op in ops if op.layer is None and groups_of.get(op.name) in groups]
            lora = None
        else:
            targets = set(stage.lora.targets)
            params = [op.name for op in layer_ops if op.projection in targets and op.name.endswith(".weight")]
            for j, sel in enumerate(stage.trainable):
                if sel in ("embeddings", "head"):
                    problems.add(("stages", i, "trainable", j),
                                 f"LoRA adapts linear layers only; '{sel}' cannot get adapters; expected layer groups "
                                 "(injected, original, all, {layers: [start, end]}) in a LoRA stage, or a stage without lora")
            injected_here, missing = unmoved_injected(stages, sorted(chosen), list(stage.lora.targets), ops,
                                                      {p: str(pol) for p, pol in policies.items()},
                                                      [e.output for e in layers if e.role == "injected"])
            if injected_here and not stage.lora.allow_frozen_injected:
                warnings.append(f"stage '{stage.name}': LoRA targets leave out {', '.join(missing)}, which are zero in the "
                                f"injected layers {injected_here}; adapters on the other projections of those layers get no "
                                "gradient through a zero output, so the injected layers never move; `train` and `emit` "
                                "refuse this stage unless lora.allow_frozen_injected is true")
            lora = LoraPlan(r=stage.lora.r, alpha=stage.lora.alpha, dropout=stage.lora.dropout,
                            targets=list(stage.lora.targets), layers=sorted(chosen))
        count = sum(numel(op.shape) for op in ops if op.name in set(params))
        if not params:
            problems.add(("stages", i, "trainable"), "selects no parameter of the output model; expected at least one layer")
        stages.append(StagePlan(name=stage.name, trainable_layers=sorted(chosen), trainable_groups=sorted(groups),
                                parameters=params, lora=lora, trainable_parameters=count))
    return stages
