"""Step 3 of compile_plan: one TensorOp per output tensor, from the layer map and the init policies."""

from __future__ import annotations

from typing import Optional

from tli_recipe.plan.model import LayerEntry, TensorOp, tensor_seed
from tli_recipe.plan.ops import OPS
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.sources import Sources
from tli_recipe.recipe.schema import Inject, Policy, Recipe
from tli_recipe.source.arch import Architecture
from tli_recipe.source.checkpoint import CODES, NAMES


def choose_policies(inject: Optional[Inject], arch: Architecture, problems: Problems) -> dict[str, Policy]:
    """The init policy of each projection of the injected layers: the recipe's, or the architecture's
    recommended one."""
    if inject is None:
        return {}
    if inject.init is None:
        return {p: Policy(kind=k) for p, k in arch.recommended_init.items()}
    policies = inject.init.policies()
    for proj, policy in policies.items():
        if proj not in arch.projections:
            problems.add(
                ("inject", "init", proj),
                f"the {arch.name} architecture has no projection '{proj}'; expected one of: "
                f"{', '.join(arch.projections)}",
                prefer_key=True,
            )
        elif policy.kind == "zero_gain" and not arch.projections[proj].norm:
            problems.add(
                ("inject", "init", proj),
                f"zero_gain sets a norm gain, and '{proj}' is not a norm; "
                f"expected zero (or a norm: {', '.join(p for p, d in arch.projections.items() if d.norm)})",
            )
    return policies


def check_lora_targets(recipe: Recipe, arch: Architecture, problems: Problems) -> None:
    for i, stage in enumerate(recipe.stages):
        for j, target in enumerate(stage.lora.targets if stage.lora is not None else ()):
            if target not in arch.projections:
                problems.add(
                    ("stages", i, "lora", "targets", j),
                    f"the {arch.name} architecture has no projection '{target}'; expected one of: "
                    f"{', '.join(arch.linear_projections)}",
                )


def _fallback(fallbacks: dict[str, set[int]], why: str, entry: LayerEntry) -> tuple[str, None]:
    fallbacks.setdefault(why, set()).add(entry.output)
    return "copy", None


def _neighbour_op(
    kind: str, entry: LayerEntry, suffix: str, proj: str, sources: Sources, shape: tuple, fallbacks: dict[str, set[int]]
) -> tuple[str, Optional[str]]:
    """interpolate and lesa read the layer after the injection point too; where that layer is
    missing (an injection after the last layer) or does not fit, the tensor is copied instead."""
    arch, tensors = sources.arch, sources.tensors
    if kind == "lesa" and (arch.projections[proj].norm or not suffix.endswith(".weight")):
        return _fallback(
            fallbacks,
            "lesa predicts the weights of linear projections; norms and biases are copied (as in the paper)",
            entry,
        )
    if kind == "lesa" and "{expert}" in "".join(m.path for m in arch.projections[proj].modules):
        return _fallback(fallbacks, "lesa is not defined for MoE expert weights; they are copied", entry)
    if entry.next_source is None:
        return _fallback(
            fallbacks,
            f"{kind} needs the layer after the injection point, and the stack ends there; "
            "the layer before is copied instead",
            entry,
        )
    if kind == "lesa" and entry.next_source != entry.source:
        return _fallback(
            fallbacks,
            "lesa needs both neighbours from one model (one SVD basis); the layer before is copied instead",
            entry,
        )
    if kind == "lesa" and any(
        tensors[entry.source].get(arch.layer_key(i, suffix), (None, None))[1] != shape
        for i in range(sources.models[entry.source].num_layers)
    ):
        return _fallback(
            fallbacks,
            f"lesa needs {suffix} in every layer of the source (one SVD basis over all layers); "
            "the layer before is copied instead",
            entry,
        )
    second = arch.layer_key(entry.next_layer, suffix)
    if tensors[entry.next_source].get(second, (None, None))[1] != shape:
        return _fallback(
            fallbacks, f"the layer after has no {suffix} of the same shape; the layer before is copied instead", entry
        )
    return kind, second


def _reference_shapes(sources: Sources) -> dict[str, tuple[int, ...]]:
    """Shapes of every layer tensor of the base model, by suffix: slices from another model must
    match them (layers may differ from each other, as dense and MoE layers of one model do)."""
    arch, base = sources.arch, sources.base
    reference: dict[str, tuple[int, ...]] = {}
    for layer, suffixes in sources.layers[base].items():
        for suffix in suffixes:
            reference.setdefault(suffix, sources.tensors[base][arch.layer_key(layer, suffix)][1])
    return reference


def assign_tensor_ops(
    recipe: Recipe, sources: Sources, layers: list[LayerEntry], policies: dict[str, Policy], problems: Problems
) -> tuple[list[TensorOp], list[str]]:
    """One TensorOp per output tensor (non-layer tensors first, then each output layer in order), and warnings."""
    arch, base = sources.arch, sources.base

    def target_code(code: str) -> str:
        # A recipe dtype casts every floating tensor; without one each tensor keeps its own
        # dtype (a float32 norm in a bfloat16 checkpoint stays float32). Integers never change.
        return CODES[recipe.dtype] if recipe.dtype and code in NAMES else code

    ops = [
        TensorOp(
            name=name, source=base, source_name=name, op="copy", shape=shape, dtype=target_code(code), source_dtype=code
        )
        for name, (code, shape) in sources.tensors[base].items()
        if arch.split_layer_key(name) is None
    ]
    warnings: list[str] = []
    reference = _reference_shapes(sources)
    unknown = sorted({s for s in reference if arch.projection_of(s) is None})
    if unknown:
        warnings.append(
            f"layer tensors not in the {arch.name} definition are copied as they are: {', '.join(unknown[:8])}"
            f"{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}"
        )
    fallbacks: dict[str, set[int]] = {}  # what a neighbour policy does instead -> output layers
    for entry in layers:
        where = ("slices", entry.slice) if entry.slice is not None else ("base_model",)
        for suffix in sources.layers[entry.source][entry.layer]:
            code, shape = sources.tensors[entry.source][arch.layer_key(entry.layer, suffix)]
            if reference.get(suffix) != shape:
                problems.add(
                    where,
                    f"{suffix} of layer {entry.layer} of {entry.source} has shape {list(shape)}, "
                    f"{base} has {list(reference[suffix]) if suffix in reference else 'no such tensor'}; "
                    "expected the same widths",
                )
                break
            ops.append(_layer_op(recipe, sources, entry, suffix, code, shape, policies, fallbacks, target_code))
    for why, outputs in sorted(fallbacks.items()):
        warnings.append(f"output layers {sorted(outputs)}: {why}")
    return ops, warnings


def _layer_op(
    recipe: Recipe,
    sources: Sources,
    entry: LayerEntry,
    suffix: str,
    code: str,
    shape: tuple,
    policies: dict[str, Policy],
    fallbacks: dict[str, set[int]],
    target_code,
) -> TensorOp:
    arch = sources.arch
    proj = arch.projection_of(suffix)
    policy = policies.get(proj) if entry.role == "injected" and proj is not None else None
    kind, value = (policy.kind, policy.value) if policy is not None else ("copy", None)
    second = None
    if kind == "zero_gain":  # the stored value whose effective gain is 0
        offset = arch.offset_of(proj)
        kind, value = ("fill", -offset) if offset else ("zero", None)
    elif OPS[kind].reads_second:
        kind, second = _neighbour_op(kind, entry, suffix, proj, sources, shape, fallbacks)
    target = arch.layer_key(entry.output, suffix)
    return TensorOp(
        name=target,
        source=entry.source,
        source_name=arch.layer_key(entry.layer, suffix),
        op=kind,
        value=value if OPS[kind].value is not None else None,
        second_source=second and entry.next_source,
        second_name=second,
        seed=tensor_seed(recipe.seed, target) if OPS[kind].seeded else None,
        shape=shape,
        dtype=target_code(code),
        source_dtype=code,
        layer=entry.output,
        projection=proj,
    )
