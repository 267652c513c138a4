"""compile_plan(recipe) -> Plan: pure data saying what every output tensor is made of.

The plan is computed from the recipe, the architecture definition, ``config.json``
and the safetensors headers; no tensor is read and torch is never imported. It holds
the output layer map, one :class:`TensorOp` per output tensor, the output config,
and the training stages resolved to layer indices and parameter names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tli_recipe._version import __version__
from tli_recipe.errors import TliError
from tli_recipe.plan.config import output_config
from tli_recipe.plan.model import (
    LayerEntry,
    Plan,
    SourceModel,
    TensorOp,
    Totals,
    recipe_hash,
    tensor_seed,
)
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.stages import resolve_stages
from tli_recipe.recipe.load import LoadedRecipe
from tli_recipe.recipe.schema import Policy, Recipe
from tli_recipe.source.arch import ArchError, Architecture, find_architecture
from tli_recipe.source.checkpoint import (
    CODES,
    NAMES,
    Checkpoint,
    numel,
    open_checkpoint,
    resolve_model,
)
from tli_recipe.source.provenance import check_pin, source_revision


def _open_source(ref: str, path: tuple, problems: Problems, cache: dict) -> Optional[Checkpoint]:
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
    problems = Problems(loaded)
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
    config, changes, blocking = output_config(base.config, configs, arch, layers, base_layers, injected, out_dtype,
                                               warnings, recipe.output_config)
    stages = resolve_stages(recipe, problems, layers, ops, arch, policies, warnings)
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
