"""compile_plan(recipe) -> Plan: pure data saying what every output tensor is made of.

The plan is computed from the recipe, the architecture definition, ``config.json``
and the safetensors headers; no tensor is read and torch is never imported. It holds
the output layer map, one :class:`TensorOp` per output tensor, the output config,
and the training stages resolved to layer indices and parameter names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .arch import Architecture, ArchError, find_architecture
from .checkpoint import CODES, NAMES, Checkpoint, nbytes, numel, open_checkpoint, resolve_model
from .errors import Problem, RecipeError, TliError
from .load import LoadedRecipe
from .provenance import check_pin, source_revision
from .recipe import LAYER_GROUPS, LayerSpan, Policy, Recipe


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceModel(Frozen):
    """One checkpoint the plan reads."""

    ref: str = Field(description="As written in the recipe: a directory or hub id.")
    path: str = Field(description="The resolved local directory.")
    architecture: str
    num_layers: int
    dtype: Optional[str]
    has_weights: bool = Field(description="False when the directory holds only config.json (plan only; run refuses).")
    revision: Optional[str] = Field(default=None, description="The commit the directory holds (hub cache snapshot, download metadata or git HEAD); None when unknown.")


class LayerEntry(Frozen):
    """One output layer: where it comes from and what it is."""

    output: int = Field(description="Output layer index, 0-based.")
    source: str = Field(description="Key of the source model in Plan.sources.")
    layer: int = Field(description="Source layer index, 0-based.")
    role: Literal["original", "injected"]
    slice: Optional[int] = Field(default=None, description="Index of the recipe slice this layer (or the layer it copies) came from.")
    next_source: Optional[str] = Field(default=None, description="Injected layers: source model of the stack layer after the injection point (None at the end of the stack).")
    next_layer: Optional[int] = Field(default=None, description="Injected layers: source layer index after the injection point.")


class TensorOp(Frozen):
    """How one output tensor is made."""

    name: str = Field(description="Output tensor name.")
    source: str = Field(description="Key of the source model in Plan.sources.")
    source_name: str = Field(description="Source tensor name (read unless op is zero or random).")
    op: Literal["copy", "zero", "fill", "scale", "noise", "random", "interpolate", "lesa"]
    value: Optional[float] = Field(default=None, description="scale factor, standard deviation, fill value, or interpolation weight.")
    second_source: Optional[str] = Field(default=None, description="interpolate, lesa: source model of the next layer's tensor.")
    second_name: Optional[str] = Field(default=None, description="interpolate, lesa: the next layer's tensor.")
    seed: Optional[int] = Field(default=None, description="Seed of this tensor's random stream (noise, random).")
    shape: tuple[int, ...]
    dtype: str = Field(description="Output safetensors dtype code (F32, BF16...).")
    source_dtype: str
    layer: Optional[int] = Field(default=None, description="Output layer index; None outside the decoder layers.")
    projection: Optional[str] = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class ConfigChange(Frozen):
    key: str
    before: Any = None
    after: Any = None
    why: str


class LoraPlan(Frozen):
    r: int
    alpha: float
    dropout: float
    targets: list[str]
    layers: list[int] = Field(description="Output layers that get adapters (peft layers_to_transform).")


class StagePlan(Frozen):
    """A training stage resolved against the output model."""

    name: str
    trainable_layers: list[int] = Field(description="Output layer indices that train.")
    trainable_groups: list[str] = Field(description="Non-layer groups that train fully (embeddings, head).")
    parameters: list[str] = Field(description="Names of the output tensors that train (for LoRA: the weights that get adapters).")
    lora: Optional[LoraPlan] = None
    trainable_parameters: int = Field(description="Element count of the parameters above (LoRA adapters not counted).")


class Totals(Frozen):
    layers_before: int
    layers_after: int
    parameters_before: int
    parameters_after: int
    bytes_to_write: int
    tensors: int


class Plan(Frozen):
    """Everything the executor does, as data. ``tli-recipe plan --json`` prints it."""

    tli_recipe_version: str
    name: str
    recipe_file: str
    recipe_sha256: str = Field(description="sha256 of the resolved recipe (after --set), canonical JSON.")
    recipe: dict[str, Any] = Field(description="The resolved recipe.")
    architecture: str
    layer_prefix: str = Field(default="model.layers.{layer}.", description="Tensor-name template of a decoder layer in the source and output checkpoints.")
    base_model: str
    sources: dict[str, SourceModel]
    dtype: str = Field(description="Output dtype name.")
    layers: list[LayerEntry]
    requires_grad_layers: list[int] = Field(description="Output indices of the injected layers (the TLI paper's Algorithm 1).")
    init: dict[str, str] = Field(description="Init policy of each projection of the injected layers; others are copied.")
    init_recommended: dict[str, str] = Field(default_factory=dict, description="The architecture's recommended function-preserving init (used when the recipe gives none).")
    identity_options: dict[str, list[str]] = Field(default_factory=dict, description="Per residual branch, the inits that make an injected layer add zero to it.")
    function_preserving: bool = Field(description="True when the output computes exactly the base model's function.")
    tensors: list[TensorOp]
    config: dict[str, Any] = Field(description="The output config.json.")
    config_changes: list[ConfigChange]
    blocking: list[str] = Field(default_factory=list, description="Choices the recipe must state before `run` (config fields that cannot follow the layer map by themselves).")
    stages: list[StagePlan]
    warnings: list[str]
    totals: Totals
    output: str
    shard_size: int
    source_files: dict[str, dict[str, str]] = Field(default_factory=dict, description="sha256 of every file each source contributes, by source key and file name; filled in by `run` (empty in `plan`).")

    def injected(self) -> list[LayerEntry]:
        return [entry for entry in self.layers if entry.role == "injected"]


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor's stream, independent of the order tensors are made in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Problems:
    """Collects plan-time problems located in the recipe; raised together at the end."""

    def __init__(self, loaded: LoadedRecipe) -> None:
        self.marks = loaded.marks
        self.items: list[Problem] = []

    def add(self, path: tuple, message: str, prefer_key: bool = False) -> None:
        self.items.append(self.marks.problem(path, message, prefer_key))

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError(self.items)


def _open_source(ref: str, path: tuple, problems: _Problems, cache: dict) -> Optional[Checkpoint]:
    if ref in cache:
        return cache[ref]
    try:
        ckpt = open_checkpoint(resolve_model(ref))
    except TliError as exc:
        problems.add(path, str(exc))
        ckpt = None
    cache[ref] = ckpt
    return ckpt


def _source_tensors(ckpt: Checkpoint, arch: Architecture, num_layers: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape): from the headers, or from config.json when there are no weights."""
    if ckpt.has_weights:
        return {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()}
    code = CODES.get(ckpt.dtype() or "float32", "F32")
    return {name: (code, shape) for name, shape in arch.expected_tensors(ckpt.config, num_layers).items()}


def compile_plan(loaded: LoadedRecipe) -> Plan:
    """Compile a validated recipe into a Plan; every problem is reported at its recipe line."""
    recipe: Recipe = loaded.recipe
    problems = _Problems(loaded)
    warnings: list[str] = []
    opened: dict[str, Optional[Checkpoint]] = {}

    base = _open_source(recipe.base_model, ("base_model",), problems, opened)
    problems.raise_if_any()
    assert base is not None
    try:
        arch = find_architecture(base.config, base.tensors)
    except ArchError as exc:
        problems.add(("base_model",), str(exc))
        problems.raise_if_any()
        raise
    if arch.inferred:
        warnings.append(f"{base.config.get('architectures', ['?'])[0]} has no definition; {arch.notes}. Layer tensors of "
                        "no recognised projection are copied; check the result with `tli-recipe verify`")
    num_layers_key = "num_hidden_layers"
    base_layers = arch.decoder_config(base.config).get(num_layers_key)
    if not base.has_weights:
        warnings.append(f"{base.path} holds no safetensors weights: tensor shapes were derived from config.json "
                        f"with the {arch.name} definition; `run` needs the weights")

    # Source models and their tensors -------------------------------------------------
    sources: dict[str, SourceModel] = {}
    tensors_of: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    layers_of: dict[str, dict[int, list[str]]] = {}  # source -> layer -> suffixes in file order

    def add_source(ref: str, path: tuple) -> Optional[str]:
        if ref in sources:
            return ref
        ckpt = _open_source(ref, path, problems, opened)
        if ckpt is None:
            return None
        try:
            src_arch = find_architecture(ckpt.config, ckpt.tensors)
        except ArchError as exc:
            problems.add(path, str(exc))
            return None
        if (src_arch.name, src_arch.layer_prefix) != (arch.name, arch.layer_prefix):
            problems.add(path, f"{ref} is a {src_arch.name} model but base_model is {arch.name}; expected slices of one architecture")
            return None
        n = arch.decoder_config(ckpt.config).get(num_layers_key)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.add(path, f"{ckpt.path / 'config.json'} has no positive integer {num_layers_key}; expected the decoder layer count")
            return None
        if ckpt.config.get("quantization_config"):
            method = ckpt.config["quantization_config"].get("quant_method", "?") if isinstance(ckpt.config["quantization_config"], dict) else "?"
            problems.add(path, f"{ref} is quantized ({method}): zeroing packed weights does not give zero; "
                               "expected a full-precision checkpoint (dequantize it first)")
            return None
        tensors = _source_tensors(ckpt, arch, n)
        per_layer: dict[int, list[str]] = {}
        for name in tensors:
            split = arch.split_layer_key(name)
            if split is not None:
                per_layer.setdefault(split[0], []).append(split[1])
        if ckpt.has_weights and sorted(per_layer) != list(range(n)):
            found = f"layers {min(per_layer)}..{max(per_layer)}" if per_layer else "no layer tensors"
            problems.add(path, f"{ckpt.path}: config.json says {num_layers_key}={n} but the weights hold {found} "
                               f"(prefix {arch.layer_prefix!r}); the checkpoint is inconsistent")
            return None
        pin_problems, pin_warnings = check_pin(ref, ckpt.path)
        for sub, message in pin_problems:
            problems.add(path + sub, message)
        warnings.extend(pin_warnings)
        revision = source_revision(ckpt.path)
        sources[ref] = SourceModel(ref=ref, path=str(ckpt.path.resolve()), architecture=arch.name, num_layers=n,
                                   dtype=ckpt.dtype(), has_weights=ckpt.has_weights, revision=revision and revision[0])
        tensors_of[ref] = tensors
        layers_of[ref] = per_layer
        return ref

    add_source(recipe.base_model, ("base_model",))
    problems.raise_if_any()

    # The stack: slices, or every base layer once ---------------------------------------
    stack: list[tuple[str, int, Optional[int]]] = []
    if recipe.slices is None:
        stack = [(recipe.base_model, i, None) for i in range(base_layers)]
    else:
        for i, piece in enumerate(recipe.slices):
            ref = piece.model or recipe.base_model
            key = add_source(ref, ("slices", i, "model") if piece.model else ("base_model",))
            if key is None:
                continue
            start, end = piece.layer_range
            n = sources[key].num_layers
            if end > n:
                problems.add(("slices", i, "layer_range"),
                             f"[{start}, {end}] ends past the {n} layers of {ref}; expected end <= {n} (half-open range)")
                continue
            stack += [(key, layer, i) for layer in range(start, end)]
    problems.raise_if_any()

    # Injection ------------------------------------------------------------------------
    inject = recipe.inject
    policies: dict[str, Policy] = {}
    if inject is not None:
        if inject.every is not None and inject.every > len(stack):
            problems.add(("inject", "every"),
                         f"{inject.every} is larger than the {len(stack)} layers of the stack"
                         f"{' of ' + recipe.base_model if recipe.slices is None else ''}; no layer would be injected; "
                         f"expected every <= {len(stack)}")
        for j, position in enumerate(inject.after or []):
            if position >= len(stack):
                problems.add(("inject", "after", j), f"stack position {position} does not exist; expected < {len(stack)} "
                                                     "(the stack's layers are 0-based)")
        if inject.between is not None and inject.between[1] > len(stack):
            problems.add(("inject", "between"), f"{list(inject.between)} ends past the {len(stack)} layers of the stack; "
                                                f"expected end <= {len(stack)} (half-open range)")
        if inject.init is not None:
            policies = inject.init.policies()
            for proj in policies:
                if proj not in arch.projections:
                    problems.add(("inject", "init", proj),
                                 f"the {arch.name} architecture has no projection '{proj}'; expected one of: {', '.join(arch.projections)}",
                                 prefer_key=True)
        else:
            policies = {p: Policy(kind=k) for p, k in arch.recommended_init.items()}
        for proj, policy in policies.items():
            if policy.kind == "zero_gain" and proj in arch.projections and not arch.projections[proj].norm:
                problems.add(("inject", "init", proj), f"zero_gain sets a norm gain, and '{proj}' is not a norm; "
                             f"expected zero (or a norm: {', '.join(p for p, d in arch.projections.items() if d.norm)})")

    # Stages are checked against the output layer count below; LoRA targets now.
    for i, stage in enumerate(recipe.stages):
        if stage.lora is not None:
            for j, target in enumerate(stage.lora.targets):
                if target not in arch.projections:
                    problems.add(("stages", i, "lora", "targets", j),
                                 f"the {arch.name} architecture has no projection '{target}'; expected one of: "
                                 f"{', '.join(p for p in arch.projections if p.endswith('_proj'))}")
    problems.raise_if_any()

    # Layer map (Algorithm 1: after stack position j when (j + 1) % K == 0) ------------------
    layers: list[LayerEntry] = []
    positions = set(inject.positions(len(stack))) if inject is not None else set()
    for j, (key, layer, piece) in enumerate(stack):
        layers.append(LayerEntry(output=len(layers), source=key, layer=layer, role="original", slice=piece))
        if j in positions:
            after = stack[j + 1] if j + 1 < len(stack) else (None, None, None)
            for _ in range(inject.copies):
                layers.append(LayerEntry(output=len(layers), source=key, layer=layer, role="injected", slice=piece,
                                         next_source=after[0], next_layer=after[1]))
    if inject is not None and inject.every is not None and len(stack) % inject.every:
        rest = len(stack) % inject.every
        tail = [e.output for e in layers[-rest:]]
        warnings.append(f"inject.every={inject.every} does not divide the {len(stack)} layers of the stack: the last {rest} "
                        f"(output layers {tail[0]}..{tail[-1]}) have no injected layer after them")

    # dtype ------------------------------------------------------------------------------
    out_dtype = recipe.dtype or sources[recipe.base_model].dtype or "float32"

    def target_code(code: str) -> str:
        # A recipe dtype casts every floating tensor; without one each tensor keeps its own
        # dtype (a float32 norm in a bfloat16 checkpoint stays float32). Integers never change.
        return CODES[recipe.dtype] if recipe.dtype and code in NAMES else code

    # Tensor operations ----------------------------------------------------------------------
    ops: list[TensorOp] = []
    base_tensors = tensors_of[recipe.base_model]
    for name, (code, shape) in base_tensors.items():
        if arch.split_layer_key(name) is None:
            ops.append(TensorOp(name=name, source=recipe.base_model, source_name=name, op="copy", shape=shape,
                                dtype=target_code(code), source_dtype=code))
    fallbacks: dict[str, set[int]] = {}  # what a neighbour policy does instead -> output layers
    # Shapes of every layer tensor of the base model, by suffix: slices from another model must
    # match them (layers may differ from each other, as dense and MoE layers of one model do).
    reference: dict[str, tuple[int, ...]] = {}
    for layer, suffixes in layers_of[recipe.base_model].items():
        for suffix in suffixes:
            reference.setdefault(suffix, base_tensors[arch.layer_key(layer, suffix)][1])
    unknown = sorted({s for s in reference if arch.projection_of(s) is None})
    if unknown:
        warnings.append(f"layer tensors not in the {arch.name} definition are copied as they are: {', '.join(unknown[:8])}"
                        f"{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}")
    for entry in layers:
        where = ("slices", entry.slice) if entry.slice is not None else ("base_model",)
        for suffix in layers_of[entry.source][entry.layer]:
            code, shape = tensors_of[entry.source][arch.layer_key(entry.layer, suffix)]
            if reference.get(suffix, shape) != shape or suffix not in reference:
                problems.add(where, f"{suffix} of layer {entry.layer} of {entry.source} has shape {list(shape)}, "
                                    f"{recipe.base_model} has {list(reference[suffix]) if suffix in reference else 'no such tensor'}; "
                                    "expected the same widths")
                break
            proj = arch.projection_of(suffix)
            policy = policies.get(proj) if entry.role == "injected" and proj is not None else None
            kind, value = (policy.kind, policy.value) if policy is not None else ("copy", None)
            second = None
            if kind == "zero_gain":  # the stored value whose effective gain is 0
                offset = arch.offset_of(proj)
                kind, value = ("fill", -offset) if offset else ("zero", None)
            elif kind in ("interpolate", "lesa"):
                kind, second = _neighbour_op(kind, entry, suffix, proj, arch, tensors_of, shape, fallbacks,
                                             {k: src.num_layers for k, src in sources.items()})
            target = arch.layer_key(entry.output, suffix)
            ops.append(TensorOp(
                name=target, source=entry.source, source_name=arch.layer_key(entry.layer, suffix), op=kind,
                value=value if kind != "lesa" else None,
                second_source=second and entry.next_source, second_name=second,
                seed=tensor_seed(recipe.seed, target) if kind in ("noise", "random") else None,
                shape=shape, dtype=target_code(code), source_dtype=code, layer=entry.output, projection=proj,
            ))
    problems.raise_if_any()
    for why, outputs in sorted(fallbacks.items()):
        warnings.append(f"output layers {sorted(outputs)}: {why}")

    injected = [e.output for e in layers if e.role == "injected"]
    identity_stack = [(k, l) for k, l, _ in stack] == [(recipe.base_model, i) for i in range(base_layers)]
    function_preserving = identity_stack and all(_is_identity(out, arch, ops) for out in injected)

    configs = {key: arch.decoder_config(opened[key].config) for key in sources}
    config, changes, blocking = _output_config(base.config, configs, arch, layers, base_layers, injected, out_dtype,
                                               warnings, recipe.output_config)
    stages = _resolve_stages(recipe, problems, layers, ops, arch, policies, warnings)
    problems.raise_if_any()

    name = recipe.name or Path(loaded.file).stem
    recipe_dict = loaded.resolved()
    before = sum(numel(s) for _, s in base_tensors.values())
    totals = Totals(layers_before=base_layers, layers_after=len(layers), parameters_before=before,
                    parameters_after=sum(numel(op.shape) for op in ops),
                    bytes_to_write=sum(op.nbytes for op in ops), tensors=len(ops))
    return Plan(
        tli_recipe_version=__version__, name=name, recipe_file=str(loaded.file), recipe_sha256=recipe_hash(recipe_dict),
        recipe=recipe_dict, architecture=arch.name, layer_prefix=arch.layer_prefix, base_model=recipe.base_model, sources=sources, dtype=out_dtype,
        layers=layers, requires_grad_layers=injected, init={p: str(v) for p, v in policies.items()},
        init_recommended=dict(arch.recommended_init),
        identity_options={b: [", ".join(f"{p}={k}" for p, k in o.items()) for o in opts] for b, opts in arch.identity_branches.items()},
        function_preserving=function_preserving, tensors=ops, config=config, config_changes=changes, blocking=blocking, stages=stages,
        warnings=warnings, totals=totals, output=recipe.output or f"out/{name}", shard_size=recipe.shard_size,
    )


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


def _neighbour_op(kind: str, entry: LayerEntry, suffix: str, proj: str, arch: Architecture, tensors_of: dict,
                  shape: tuple, fallbacks: dict[str, set[int]], num_layers: dict[str, int]) -> tuple[str, Optional[str]]:
    """interpolate and lesa read the layer after the injection point too; where that layer is
    missing (an injection after the last layer) or does not fit, the tensor is copied instead."""
    if kind == "lesa" and (arch.projections[proj].norm or not suffix.endswith(".weight")):
        fallbacks.setdefault("lesa predicts the weights of linear projections; norms and biases are copied (as in the paper)", set()).add(entry.output)
        return "copy", None
    if kind == "lesa" and "{expert}" in "".join(m.path for m in arch.projections[proj].modules):
        fallbacks.setdefault("lesa is not defined for MoE expert weights; they are copied", set()).add(entry.output)
        return "copy", None
    if entry.next_source is None:
        fallbacks.setdefault(f"{kind} needs the layer after the injection point, and the stack ends there; "
                             "the layer before is copied instead", set()).add(entry.output)
        return "copy", None
    if kind == "lesa" and entry.next_source != entry.source:
        fallbacks.setdefault("lesa needs both neighbours from one model (one SVD basis); the layer before is copied instead",
                             set()).add(entry.output)
        return "copy", None
    if kind == "lesa" and any(tensors_of[entry.source].get(arch.layer_key(i, suffix), (None, None))[1] != shape
                              for i in range(num_layers[entry.source])):
        fallbacks.setdefault(f"lesa needs {suffix} in every layer of the source (one SVD basis over all layers); "
                             "the layer before is copied instead", set()).add(entry.output)
        return "copy", None
    second = arch.layer_key(entry.next_layer, suffix)
    if tensors_of[entry.next_source].get(second, (None, None))[1] != shape:
        fallbacks.setdefault(f"the layer after has no {suffix} of the same shape; the layer before is copied instead",
                             set()).add(entry.output)
        return "copy", None
    return kind, second


def _is_identity(layer: int, arch: Architecture, ops: list[TensorOp]) -> bool:
    """True when the injected ``layer`` adds nothing to the residual stream: each residual branch
    of the architecture has one option whose projections are all written as an exact zero
    (``zero``: every tensor 0; ``zero_gain``: every gain at its effective 0)."""
    mine = [op for op in ops if op.layer == layer]

    def exact(proj: str, kind: str) -> bool:
        tensors = [op for op in mine if op.projection == proj]
        if kind == "zero_gain":
            offset = arch.offset_of(proj)
            ok = lambda op: (op.op == "fill" and op.value == -offset) or (offset == 0 and op.op == "zero")  # noqa: E731
        else:
            ok = lambda op: op.op == "zero" or (op.op == "scale" and op.value == 0)  # noqa: E731
        return bool(tensors) and all(ok(op) for op in tensors)

    return bool(arch.identity_branches) and all(
        any(all(exact(p, k) for p, k in option.items()) for option in options)
        for options in arch.identity_branches.values())


def _output_config(config: dict, configs: dict[str, dict], arch: Architecture, layers: list[LayerEntry], n_before: int,
                   injected: list[int], dtype: str, warnings: list[str],
                   overrides: dict[str, Any]) -> tuple[dict, list[ConfigChange], list[str]]:
    """The output config.json, its changes, and what blocks `run` until the recipe chooses.

    ``configs`` holds each source's decoder config; the decoder part of the output is
    nested under ``arch.config_path`` for a VLM. Every per-layer list follows the layer map;
    config keys that list layer indices are rewritten from each output layer's source.
    """
    out = json.loads(json.dumps(config))
    decoder = out
    for key in arch.config_path:
        decoder = decoder.setdefault(key, {})
    dotted = "".join(f"{k}." for k in arch.config_path)
    changes: list[ConfigChange] = []
    blocking: list[str] = []

    def change(key: str, after: Any, why: str, where: dict | None = None, name: str | None = None) -> None:
        where = decoder if where is None else where
        if where.get(key) != after:
            changes.append(ConfigChange(key=name or dotted + key, before=where.get(key), after=after, why=why))
            where[key] = after

    change("num_hidden_layers", len(layers), "layer count of the output stack")
    handled = set()
    for key in sorted(set(arch.per_layer_lists) | set(arch.derived_lists)):
        # Each output layer takes the entry of its own source layer, in its own source's config.
        per_source, derived = {}, False
        for ref, cfg in configs.items():
            n = cfg["num_hidden_layers"]
            values = cfg.get(key)
            if values is None:
                values = arch.derive_list(key, cfg, n)
                derived = derived or values is not None
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != n:
                raise TliError(f"{ref}: config.json {key} has {len(values) if isinstance(values, list) else 'no list of'} "
                               f"entries for {n} layers; the config is inconsistent")
            per_source[ref] = values
        if not per_source:
            continue
        handled.add(key)
        missing = sorted({e.source for e in layers} - set(per_source))
        if missing:
            raise TliError(f"{missing[0]}: config.json has no {key}, which the base model's config has; "
                           "expected slices of models with the same config layout")
        grown = [per_source[e.source][e.layer] for e in layers]
        change(key, grown, ("derived from the config as transformers does, then " if derived else "")
               + "re-indexed by the layer map (an injected layer takes its source's entry)")
        # A rule key (a threshold, a period) that would now derive a different list no longer
        # describes the stack: transformers reads the explicit list, other tools may read the rule.
        rule_keys = [k for k in arch.derived_from.get(key, ()) if k in decoder and k not in handled]
        if rule_keys and arch.derive_list(key, decoder, len(layers)) != grown:
            for rule_key in rule_keys:
                handled.add(rule_key)
                if rule_key in overrides or dotted + rule_key in overrides:
                    continue
                fits = [v for v in range(1, len(layers) + 1) if isinstance(decoder[rule_key], int)
                        and arch.derive_list(key, {**decoder, rule_key: v}, len(layers)) == grown]
                hint = f" ({rule_key}: {fits[0]} reproduces the grown {key})" if fits else ""
                blocking.append(
                    f"config.json {dotted}{rule_key}={decoder[rule_key]!r} derives {key} by a rule that the grown stack "
                    f"no longer follows ({key} is written explicitly and transformers uses it; other tools may read "
                    f"{rule_key}); state the choice in the recipe: output_config: {{{dotted}{rule_key}: null}} to remove it, "
                    f"or a value to keep{hint}")
    for key, expr in arch.index_lists.items():
        flags = {ref: arch.layer_flags(expr, cfg, cfg["num_hidden_layers"]) for ref, cfg in configs.items()}
        listed = [e.output for e in layers if flags[e.source][e.layer]]
        before = decoder.get(key)
        if key in decoder or listed:
            change(key, listed, "layer indices of this kind, re-indexed from each output layer's source")
            if decoder.get(key) != before:
                for reset_key, value in arch.index_list_resets.items():
                    change(reset_key, value, f"{key} now lists every such layer explicitly")
        handled.add(key)
    for key, value in decoder.items():
        if key not in handled and isinstance(value, list) and len(value) == n_before and n_before > 2 and key != "architectures":
            warnings.append(f"config.json: {dotted}{key} has one entry per layer but the {arch.name} definition does not "
                            f"list it as a per-layer list; it is left unchanged (add it to per_layer_lists if it is one)")
    change("requires_grad_layers", injected, "output indices of the injected layers (TLI Algorithm 1)", out, "requires_grad_layers")
    dtype_key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    change(dtype_key, dtype, "dtype of the output tensors", out, dtype_key)
    for key, value in overrides.items():  # the recipe's explicit choices come last
        *parents, leaf = key.split(".")
        where = out
        for parent in parents:
            where = where.setdefault(parent, {})
        if value is None:
            if leaf in where:
                changes.append(ConfigChange(key=key, before=where.pop(leaf), after=None, why="removed by output_config"))
        else:
            change(leaf, value, "set by output_config", where, key)
    return out, changes, blocking


def _resolve_stages(recipe: Recipe, problems: _Problems, layers: list[LayerEntry], ops: list[TensorOp],
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


__all__ = ["Plan", "LayerEntry", "TensorOp", "StagePlan", "compile_plan", "LAYER_GROUPS"]
