"""Sparse upcycling (arXiv 2212.05055), steps of compile_plan: the dense MLP of chosen output layers
becomes E experts and a router, in the MoE sibling architecture of the source.

Order: slices, then inject, then upcycle. The layer map is built as for a dense model; upcycling
then replaces each MLP tensor of a chosen output layer (injected ones included) by one tensor per
expert and adds the layer's router. A dense tensor the layer map copies becomes, in each expert, a
copy (a byte copy when the dtype stays) from the layer's own source or from ``sources[i]``, with the
expert's policy; a tensor the inject init sets (a zeroed ``down_proj``) is set so in every expert, so
an injected identity layer stays the identity. Nothing here reads a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tli_recipe.errors import did_you_mean
from tli_recipe.plan.model import LayerEntry, TensorOp, UpcyclePlan, tensor_seed
from tli_recipe.plan.ops import OPS
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.sources import Sources, add_source
from tli_recipe.recipe.schema import LayerSpan, Policy, Recipe, Upcycle
from tli_recipe.source.arch import (
    ArchError,
    Architecture,
    Module,
    evaluate_rule,
    load_architectures,
)
from tli_recipe.source.checkpoint import numel
from tli_recipe.source.moe import UpcycleSpec

ORDER = "slices, then inject, then upcycle: the layers of the grown stack (injected ones included) are upcycled"
ROUTER = "router"


@dataclass
class Upcycling:
    """An upcycle section resolved against the sources (before the layer map)."""

    recipe: Upcycle
    arch: Architecture  # the output (MoE) architecture
    spec: UpcycleSpec
    expert_sources: list[Optional[str]]  # source key of each expert's MLP; None: the layer's own source
    layers: Optional[list[int]] = None  # output layers upcycled (set by select_layers)
    breaks: Optional[dict] = None  # output layer -> why its experts differ from its dense MLP (upcycle_ops)

    @property
    def expert_modules(self) -> dict[str, Module]:
        """MLP projection -> its expert module in the output architecture (``block_sparse_moe.experts.{expert}.w1``)."""
        return {
            name: next(m for m in proj.modules if m.experts is not None)
            for name, proj in self.arch.projections.items()
            if any(m.experts is not None for m in proj.modules)
        }


def _moe_definitions() -> dict[str, Architecture]:
    return {name: arch for name, arch in load_architectures().items() if arch.upcycle is not None}


def resolve_upcycle(recipe: Recipe, sources: Sources, problems: Problems) -> Optional[Upcycling]:
    """The output architecture and the expert sources; None (with located problems) when unusable."""
    up = recipe.upcycle
    if up is None:
        return None
    out = _output_architecture(up, sources, problems)
    if out is None:
        return None
    _check_requirements(out, sources, sources.base, ("base_model",), problems)
    if up.router.kind == "hidden":
        folder = sources.models[sources.base].path
        if not any(
            (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            sources.warnings.append(
                f"{folder} has no tokenizer files: the hidden router init tokenizes its prompts "
                "with the source's tokenizer, so `run` will fail until they are there"
            )
    keys: list[Optional[str]] = [None] * up.experts
    for i, entry in enumerate(up.sources or []):
        if i < up.experts:
            where = ("upcycle", "sources", i, "model")
            keys[i] = add_source(sources, entry.model, where, problems)
            if keys[i] is not None and keys[i] != sources.base and keys[i] in sources.configs:
                # An expert's MLP comes from this source: the output architecture's requirements
                # (no MLP bias in Mixtral) hold for it as for base_model, or its tensors would be dropped.
                _check_requirements(out, sources, keys[i], where, problems)
    return Upcycling(recipe=up, arch=out, spec=out.upcycle, expert_sources=keys)


def _check_requirements(out: Architecture, sources: Sources, key: str, where: tuple, problems: Problems) -> None:
    """The output architecture's ``upcycle.requires`` rules over one source's config, located at ``where``."""
    names = sources.arch.names(sources.configs[key])
    what = "base_model's config" if where == ("base_model",) else f"the config of upcycle.sources[{where[2]}]"
    for expr, why in out.upcycle.requires.items():
        try:
            holds = evaluate_rule(expr, names, f"{out.name} upcycle requirement")
        except ArchError as exc:
            problems.add(where, str(exc))
            continue
        if not holds:
            problems.add(
                ("upcycle",) if where == ("base_model",) else where,
                f"{why}, and {what} does not meet `{expr}`; expected a source {out.name} can hold",
                prefer_key=where == ("base_model",),
            )


def _output_architecture(up: Upcycle, sources: Sources, problems: Problems) -> Optional[Architecture]:
    src = sources.arch
    moe = _moe_definitions()
    model_type = sources.configs[sources.base].get("model_type") or sources.base_config.get("model_type")
    siblings = ", ".join(f"{t} -> {n}" for n, a in sorted(moe.items()) for t in a.upcycle.from_types)
    if src.upcycle is not None or ROUTER in src.projections:
        problems.add(
            ("upcycle",),
            f"base_model is already a Mixture-of-Experts model ({src.name}); expected a dense model ({siblings})",
            prefer_key=True,
        )
        return None
    if up.output is None:
        fit = [a for _, a in sorted(moe.items()) if model_type in a.upcycle.from_types]
        if not fit:
            problems.add(
                ("upcycle",),
                f"{src.name} models (model_type {model_type!r}) have no MoE sibling with an "
                f"architecture definition; expected a base model of one of: {siblings}",
                prefer_key=True,
            )
            return None
        return fit[0]
    out = moe.get(up.output)
    if out is None:
        problems.add(
            ("upcycle", "output"),
            f"'{up.output}' is not an MoE architecture tli-recipe writes"
            f"{did_you_mean(up.output, list(moe))}; expected one of: {', '.join(sorted(moe))}",
        )
        return None
    if model_type not in out.upcycle.from_types or out.layer_prefix != src.layer_prefix:
        problems.add(
            ("upcycle", "output"),
            f"{out.name} is the MoE sibling of {', '.join(out.upcycle.from_types)} models, "
            f"and base_model is model_type {model_type!r}; expected one of: {siblings}",
        )
        return None
    return out


def select_layers(upc: Upcycling, layers: list[LayerEntry], problems: Problems) -> list[int]:
    """The output layers to upcycle (after slices and inject)."""
    n = len(layers)
    chosen: set[int] = set()
    for j, sel in enumerate(upc.recipe.layers or ["all"]):
        if isinstance(sel, LayerSpan):
            start, end = sel.layers
            if end > n:
                problems.add(
                    ("upcycle", "layers", j, "layers"),
                    f"[{start}, {end}] ends past the {n} output layers (after slices and inject); expected "
                    f"end <= {n} (half-open range)",
                )
            chosen |= set(range(start, min(end, n)))
        elif sel == "all":
            chosen |= set(range(n))
        else:
            chosen |= {e.output for e in layers if e.role == sel}
    if upc.spec.dense_layers_key is None and upc.recipe.layers is not None and len(chosen) < n:
        problems.add(
            ("upcycle", "layers"),
            f"every {upc.arch.name} layer is sparse (it has no dense layers), and these "
            f"select {len(chosen)} of the {n} output layers; expected every layer "
            "(leave out upcycle.layers)",
        )
    upc.layers = sorted(chosen)
    return upc.layers


def upcycle_ops(
    recipe: Recipe,
    sources: Sources,
    layers: list[LayerEntry],
    ops: list[TensorOp],
    upc: Upcycling,
    problems: Problems,
    hidden: Optional[int] = None,
) -> list[TensorOp]:
    """The dense ops with each MLP tensor of an upcycled layer replaced by its experts' tensors, and a
    router per layer (``hidden``: the residual width when widen changed it)."""
    arch, chosen = sources.arch, set(upc.layers)
    experts = upc.expert_modules
    if hidden is None:
        hidden = sources.arch.names(sources.configs[sources.base]).get("hidden_size")
    entries = {e.output: e for e in layers}
    reported: set[int] = set()  # expert sources already reported as misfits
    upc.breaks = {}
    out: list[TensorOp] = []
    routed: set[int] = set()
    for op in ops:
        if op.layer not in chosen or op.projection not in experts:
            out.append(op)
            continue
        if op.layer not in routed:  # the router goes first, before the layer's experts
            routed.add(op.layer)
            out.append(_router_op(recipe, upc, entries[op.layer], op, hidden))
        module, _, tail = arch.split_layer_key(op.name)[1].rpartition(".")
        for e, policy in enumerate(upc.recipe.expert_policies()):
            name = arch.layer_key(op.layer, f"{experts[op.projection].path.replace('{expert}', str(e))}.{tail}")
            out.append(_expert_op(recipe, sources, upc, op, e, policy, name, problems, reported))
    return out


def _router_op(recipe: Recipe, upc: Upcycling, entry: LayerEntry, dense: TensorOp, hidden: Any) -> TensorOp:
    name = upc.arch.layer_key(entry.output, upc.arch.projections[ROUTER].modules[0].path + ".weight")
    policy: Policy = upc.recipe.router
    return TensorOp(
        name=name,
        source=entry.source,
        source_name="",
        op=policy.kind,
        value=policy.value,
        seed=tensor_seed(recipe.seed, name) if OPS[policy.kind].seeded else None,
        shape=(upc.recipe.experts, int(hidden)),
        dtype=dense.dtype,
        source_dtype=dense.dtype,
        layer=entry.output,
        projection=ROUTER,
    )


def _expert_op(
    recipe: Recipe,
    sources: Sources,
    upc: Upcycling,
    dense: TensorOp,
    e: int,
    policy: Policy,
    name: str,
    problems: Problems,
    reported: set[int],
) -> TensorOp:
    """Expert ``e``'s copy of a dense tensor: a plain copy of the dense op gets the expert's source and policy;
    a tensor the inject init set (zero, noise...) is set the same way in every expert."""
    if dense.op != "copy":
        seed = tensor_seed(recipe.seed, name) if OPS[dense.op].seeded else None
        return dense.model_copy(update={"name": name, "seed": seed, "expert": e})
    key = upc.expert_sources[e] or dense.source
    found = sources.tensors.get(key, {}).get(dense.source_name)
    if found is None or found[1] != dense.shape:
        if e not in reported and upc.expert_sources[e] is not None:
            reported.add(e)
            what = f"has shape {list(found[1])}" if found else "has no such tensor"
            problems.add(
                ("upcycle", "sources", e, "model"),
                f"{dense.source_name} of {key} {what}, base_model's is {list(dense.shape)}; expected a "
                "checkpoint of the same architecture and widths",
            )
        found = (dense.source_dtype, dense.shape)
    kind = policy.kind
    if kind != "copy":
        upc.breaks.setdefault(dense.layer, set()).add(f"expert {e}: {policy}")
    if key != dense.source:
        upc.breaks.setdefault(dense.layer, set()).add(f"expert {e} from {key}")
    return dense.model_copy(
        update={
            "name": name,
            "source": key,
            "op": kind,
            "value": policy.value if OPS[kind].value else None,
            "seed": tensor_seed(recipe.seed, name) if OPS[kind].seeded else None,
            "source_dtype": found[0],
            "expert": e,
        }
    )


class UpcycleConfig:
    """The output config's MoE keys, applied by rewrite_config before the recipe's output_config."""

    def __init__(self, upc: Upcycling, n_layers: int, intermediate: Any) -> None:
        self.upc, self.n_layers, self.intermediate = upc, n_layers, intermediate

    @property
    def owned(self) -> set[str]:
        spec = self.upc.spec
        return {k for k in (spec.experts_key, spec.top_k_key, spec.expert_width_key, spec.dense_layers_key) if k}

    def apply(self, rw) -> None:
        upc, spec, why = self.upc, self.upc.spec, "sparse upcycling"
        rw.change("architectures", [upc.arch.architectures[0]], f"{why}: the MoE architecture", rw.out, "architectures")
        rw.change("model_type", upc.arch.model_types[0], f"{why}: the MoE architecture", rw.out, "model_type")
        rw.change(spec.experts_key, upc.recipe.experts, f"{why}: experts per upcycled layer")
        rw.change(spec.top_k_key, upc.recipe.top_k, f"{why}: experts per token")
        if spec.expert_width_key:
            rw.change(spec.expert_width_key, self.intermediate, f"{why}: each expert is a copy of the dense MLP")
        if spec.dense_layers_key:
            dense = [i for i in range(self.n_layers) if i not in set(upc.layers)]
            rw.change(spec.dense_layers_key, dense, f"{why}: output layers that keep their dense MLP")
        for key, value in spec.set.items():
            rw.change(key, value, f"{why}: {upc.arch.name} setting")
        for key, value in spec.aux_loss.items():
            if key not in rw.decoder:
                rw.change(
                    key, value, f"{why}: router auxiliary loss ({upc.arch.name} default; output_config may set it)"
                )


def upcycle_summary(upc: Upcycling, ops: list[TensorOp], config: dict, identity_layers: set[int]) -> UpcyclePlan:
    """Counts (total, active per token), the renormalisation, and what breaks function preservation."""
    names = upc.arch.names(config)
    try:
        renormalised = bool(evaluate_rule(upc.spec.renormalised, names, "renormalised"))
    except ArchError:
        renormalised = False
    up, reasons = upc.recipe, []
    per_expert: dict[int, int] = {}
    for op in ops:
        if op.expert == 0:
            per_expert[op.layer] = per_expert.get(op.layer, 0) + numel(op.shape)
    differ = sorted({why for layer, whys in upc.breaks.items() if layer not in identity_layers for why in whys})
    if differ:
        reasons.append(f"the experts are not all copies of the dense MLP ({'; '.join(differ)})")
    if not renormalised and set(upc.layers) - identity_layers:
        reasons.append(
            f"{upc.arch.name} does not renormalise the top-k routing weights here "
            f"({upc.spec.renormalised} is false), so they sum to less than 1"
        )
    total = sum(numel(op.shape) for op in ops)
    active = total - sum((up.experts - up.top_k) * n for n in per_expert.values())
    return UpcyclePlan(
        output_architecture=upc.arch.name,
        experts=up.experts,
        top_k=up.top_k,
        layers=upc.layers,
        dense_layers=sorted({op.layer for op in ops if op.layer is not None} - set(upc.layers)),
        router=str(up.router),
        prompts=[p.model_dump() for p in up.prompts or []],
        expert_init=[str(p) for p in up.expert_policies()],
        expert_sources=list(upc.expert_sources),
        parameters_total=total,
        parameters_active=active,
        renormalised=renormalised,
        breaks_preservation=reasons,
        aux_loss={k: config.get(k) for k in upc.spec.aux_loss},
        order=ORDER,
    )


def check_output_tensors(upc: Upcycling, ops: list[TensorOp], config: dict, n_layers: int, problems: Problems) -> None:
    """The written tensors are exactly those of a checkpoint of the output architecture (names and shapes)."""
    try:
        expected = upc.arch.expected_tensors(config, n_layers)
    except ArchError as exc:
        problems.add(
            ("upcycle",), f"the output config does not describe a {upc.arch.name} model: {exc}", prefer_key=True
        )
        return
    planned = {op.name: tuple(op.shape) for op in ops}
    odd = sorted(set(planned) ^ set(expected)) or sorted(n for n in planned if planned[n] != expected[n])
    if odd:
        problems.add(
            ("upcycle",),
            f"the output would not be a {upc.arch.name} checkpoint that transformers loads "
            f"({len(odd)} tensor names or shapes differ from the {upc.arch.name} definition, "
            f"first: {odd[0]}); expected a source of the layout {upc.arch.name} holds",
            prefer_key=True,
        )


def check_moe_lora(recipe: Recipe, upc: Upcycling, stages, problems: Problems) -> None:
    """LoRA cannot adapt routers or experts: transformers holds them as plain (fused) parameters."""
    moe_projections = set(upc.expert_modules) | {ROUTER}
    for i, (stage, plan) in enumerate(zip(recipe.stages, stages)):
        if stage.lora is None or not set(plan.lora.layers) & set(upc.layers):
            continue
        for j, target in enumerate(stage.lora.targets):
            if target in moe_projections:
                problems.add(
                    ("stages", i, "lora", "targets", j),
                    f"'{target}' in upcycled layers is an MoE {'router' if target == ROUTER else 'expert'} "
                    "weight, which transformers holds as a plain parameter (experts fused per layer), not a "
                    "linear module LoRA can adapt; expected attention targets, or a full-weight stage with "
                    "trainable: [router] or [experts]",
                )


#: Bytes per element of the output dtypes; transformers' default experts implementation (grouped_mm)
#: refuses an expert weight whose rows are not a multiple of 16 bytes ("strides should be multiple of
#: 16 bytes", torch 2.13 on CPU, transformers 5.25; docs/widen.md).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ALIGN_BYTES = 16


def check_expert_widths(recipe: Recipe, widths: dict, source: dict, dtype: str, problems: Problems) -> None:
    """Refuse an MoE output whose expert width (intermediate) or hidden size is not a multiple of 16 bytes
    in ``dtype``: its experts' grouped matmul fails in transformers. Located at the widen field that made
    the width, else at ``upcycle``; ``source`` holds the base model's widths (the least sizes widen takes)."""
    step = ALIGN_BYTES // DTYPE_BYTES.get(dtype, 4)
    w = recipe.widen

    def near(value: int, unit: int, least: int) -> str:
        lo, hi = value // unit * unit, -(-value // unit) * unit
        return " or ".join(str(v) for v in dict.fromkeys(v for v in (lo, hi) if v >= least))

    why = (
        "transformers' grouped expert kernel (the default experts implementation) needs each expert weight row "
        f"to be a multiple of {ALIGN_BYTES} bytes: a multiple of {step} in {dtype}"
    )
    hidden, inter = widths.get("hidden_size"), widths.get("intermediate_size")
    if isinstance(hidden, int) and hidden % step:
        if w is not None and w.hidden_size is not None:
            unit = math.lcm(source["hidden_size"], step)
            problems.add(
                ("widen", "hidden_size"),
                f"{hidden} is the hidden size of an MoE output, and {why}; expected a multiple of {unit}: "
                f"{near(hidden, unit, unit)}",
            )
        else:
            problems.add(
                ("upcycle",),
                f"the hidden size {hidden} of base_model is not a multiple of {step}, and {why}; expected a base "
                f"model whose hidden_size is (or widen.hidden_size a multiple of {math.lcm(hidden, step)})",
                prefer_key=True,
            )
    if isinstance(inter, int) and inter % step:
        least = source.get("intermediate_size", inter)
        sizes = near(inter, step, least)
        if w is not None and w.intermediate_size is not None:
            problems.add(
                ("widen", "intermediate_size"),
                f"{inter} is the expert width of an MoE output, and {why}; expected {sizes}",
            )
        elif w is not None and w.hidden_size is not None:
            problems.add(
                ("widen", "hidden_size"),
                f"it makes the expert width {inter}, and {why}; expected widen.intermediate_size {sizes}",
            )
        else:
            problems.add(
                ("upcycle",),
                f"the expert width would be base_model's intermediate_size {inter}, and {why}; expected "
                f"widen.intermediate_size {near(inter, step, inter)}",
                prefer_key=True,
            )
