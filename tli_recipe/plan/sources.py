"""Step 1 of compile_plan: open the source checkpoints and build the stack of source layers.

Nothing here reads a tensor: config.json and the safetensors headers say everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tli_recipe.errors import TliError
from tli_recipe.plan.model import SourceModel
from tli_recipe.plan.problems import Problems
from tli_recipe.recipe.schema import Recipe
from tli_recipe.source.arch import (
    ArchError,
    Architecture,
    evaluate_rule,
    find_architecture,
)
from tli_recipe.source.checkpoint import CODES, Checkpoint
from tli_recipe.source.hub import Access, open_model
from tli_recipe.source.revisions import check_pin, source_revision

#: The most output layers a plan may have, as a multiple of the base model's layer count:
#: growth methods stay far below (LLaMA Pro 1.25x, TLI 1.5x, DUS 1.5x), while a typo such as
#: ``copies: 100000000`` is refused before anything is built.
MAX_GROWTH = 16

#: The access of a caller that names none (``Access`` is frozen, so one shared default is safe).
DEFAULT_ACCESS = Access()

Tensors = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype code, shape)


@dataclass
class Sources:
    """The source checkpoints of a recipe, and the stack of source layers they give."""

    arch: Architecture
    base: str  # source key of base_model
    base_config: dict  # base_model's whole config.json
    models: dict[str, SourceModel] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)  # source key -> decoder config
    tensors: dict[str, Tensors] = field(default_factory=dict)
    layers: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # source -> layer -> suffixes in file order
    where: dict[str, tuple] = field(default_factory=dict)  # source key -> recipe field path
    stack: list[tuple[str, int, Optional[int]]] = field(default_factory=list)  # (source, layer, slice index)
    warnings: list[str] = field(default_factory=list)
    access: Access = field(default_factory=Access)  # how far a hub id may be fetched

    @property
    def base_layers(self) -> int:
        return self.models[self.base].num_layers


def _open(ref: str, path: tuple, problems: Problems, access: Access) -> Optional[Checkpoint]:
    try:
        return open_model(ref, access)
    except TliError as exc:
        problems.add(path, str(exc))
        return None


def _source_tensors(ckpt: Checkpoint, arch: Architecture, num_layers: int) -> Tensors:
    """name -> (dtype code, shape): from the headers, or from config.json when there are no weights."""
    if ckpt.has_weights:
        return {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()}
    code = CODES.get(ckpt.dtype() or "float32", "F32")
    return {name: (code, shape) for name, shape in arch.expected_tensors(ckpt.config, num_layers).items()}


def missing_projections(
    arch: Architecture, config: dict, per_layer: dict[int, list[str]], num_layers: int
) -> list[tuple[int, str]]:
    """(layer, tensor suffix) of each projection that one layer lacks while other layers have it.

    A projection is expected in a layer when one of its module spellings applies there
    (``when``): a dense layer of an MoE model has no router, and that is not a gap."""
    have: dict[str, dict[int, str]] = {}  # projection -> layer -> one of its suffixes there
    for layer, suffixes in per_layer.items():
        for suffix in suffixes:
            proj = arch.projection_of(suffix)
            if proj is not None:
                have.setdefault(proj, {}).setdefault(layer, suffix)
    gaps = []
    names: dict = {}
    if any(len(found) < num_layers for found in have.values()):
        try:
            names = arch.names(config)
        except KeyError:  # a default over a key this config lacks: the raw values will do
            names = dict(config)
    for proj, found in have.items():
        if len(found) == num_layers:
            continue
        example = next(iter(found.values()))
        for layer in range(num_layers):
            if layer in found:
                continue
            scope = {**names, "layer": layer}
            try:
                expected = any(evaluate_rule(m.when, scope, m.path) for m in arch.projections[proj].modules)
            except KeyError:  # a condition over a key this config lacks: no judgement
                expected = False
            if expected:
                gaps.append((layer, example))
    return sorted(gaps)


#: How many disagreeing tensors a message names (the rest are counted).
SHOWN_DISAGREEMENTS = 3


def config_disagreements(ckpt: Checkpoint, arch: Architecture, tensors: Tensors, n: int) -> Optional[str]:
    """What config.json says that the weights contradict, or None.

    Every tensor's shape is compared with the shape the architecture definition derives from
    config.json, and a tensor of a known projection that the config says does not exist (a bias
    under ``mlp_bias: false``) is named: either would give an output that transformers cannot load,
    or tensors that upcycling silently drops.
    """
    try:
        expected = arch.expected_tensors(ckpt.config, n)
    except ArchError as exc:
        return f"{ckpt.path / 'config.json'}: {exc}"
    wrong: list[str] = []
    for name, (_, shape) in tensors.items():
        want = expected.get(name)
        if want is not None:
            if tuple(shape) != tuple(want):
                wrong.append(f"'{name}' is {list(shape)} in the weights, config.json gives {list(want)}")
            continue
        split = arch.split_layer_key(name)
        if split is not None and arch.projection_of(split[1]) is not None and name.endswith(".bias"):
            wrong.append(f"'{name}' is in the weights, and config.json says the projection has no bias")
    if not wrong:
        return None
    more = f"; and {len(wrong) - SHOWN_DISAGREEMENTS} more" if len(wrong) > SHOWN_DISAGREEMENTS else ""
    return (
        f"{ckpt.path}: config.json disagrees with the weights ({len(wrong)} tensor{'s' * (len(wrong) != 1)}): "
        f"{'; '.join(wrong[:SHOWN_DISAGREEMENTS])}{more}; expected a config.json that describes these weights "
        "(fix it or re-download the checkpoint)"
    )


def _check_model(
    ref: str, ckpt: Checkpoint, arch: Architecture, key: str, problems: Problems, path: tuple
) -> Optional[int]:
    """The layer count of a usable source checkpoint; None (with a problem) otherwise."""
    try:
        n = arch.decoder_config(ckpt.config).get(key)
    except ArchError as exc:
        problems.add(path, str(exc))
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.add(
            path, f"{ckpt.path / 'config.json'} has no positive integer {key}; expected the decoder layer count"
        )
        return None
    quantization = ckpt.config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        method = method if isinstance(method, str) and method.isidentifier() else "?"
        problems.add(
            path,
            f"{ref} is quantized ({method}): zeroing packed weights does not give zero; "
            "expected a full-precision checkpoint (dequantize it first)",
        )
        return None
    return n


def _layers_of(
    ckpt: Checkpoint, arch: Architecture, tensors: Tensors, n: int, key: str, problems: Problems, path: tuple
) -> Optional[dict[int, list[str]]]:
    per_layer: dict[int, list[str]] = {}
    for name in tensors:
        split = arch.split_layer_key(name)
        if split is not None:
            per_layer.setdefault(split[0], []).append(split[1])
    if not ckpt.has_weights:
        return per_layer
    if sorted(per_layer) != list(range(n)):
        found = f"layers {min(per_layer)}..{max(per_layer)}" if per_layer else "no layer tensors"
        problems.add(
            path,
            f"{ckpt.path}: config.json says {key}={n} but the weights hold {found} "
            f"(prefix {arch.layer_prefix!r}); the checkpoint is inconsistent",
        )
        return None
    try:
        gaps = missing_projections(arch, arch.decoder_config(ckpt.config), per_layer, n)
    except ArchError as exc:
        problems.add(path, str(exc))
        return None
    for layer, suffix in gaps:
        problems.add(
            path,
            f"{ckpt.path}: layer {layer} has no tensor '{arch.layer_key(layer, suffix)}', which the other "
            f"layers have ({arch.projection_of(suffix)}); the checkpoint is incomplete: re-download or fix it",
        )
    return None if gaps else per_layer


def add_source(
    sources: Sources, ref: str, path: tuple, problems: Problems, ckpt: Optional[Checkpoint] = None
) -> Optional[str]:
    """Open one source (once), check it fits the base architecture, and record its tensors."""
    if ref in sources.models:
        return ref
    arch = sources.arch
    ckpt = ckpt or _open(ref, path, problems, sources.access)
    if ckpt is None:
        return None
    try:
        src_arch = find_architecture(ckpt.config, ckpt.tensors)
    except ArchError as exc:
        problems.add(path, str(exc))
        return None
    if (src_arch.name, src_arch.layer_prefix) != (arch.name, arch.layer_prefix):
        problems.add(
            path, f"{ref} is a {src_arch.name} model but base_model is {arch.name}; expected slices of one architecture"
        )
        return None
    n = _check_model(ref, ckpt, arch, arch.num_layers_key, problems, path)
    if n is None:
        return None
    try:
        tensors = _source_tensors(ckpt, arch, n)
    except ArchError as exc:
        problems.add(path, str(exc))
        return None
    per_layer = _layers_of(ckpt, arch, tensors, n, arch.num_layers_key, problems, path)
    if per_layer is None:
        return None
    if ckpt.has_weights and not arch.inferred:
        disagreements = config_disagreements(ckpt, arch, tensors, n)
        if disagreements:
            problems.add(path, disagreements)
            return None
    pin_problems, pin_warnings = check_pin(ref, ckpt.path)
    for sub, message in pin_problems:
        problems.add(path + sub, message)
    sources.warnings.extend(pin_warnings)
    revision = source_revision(ckpt.path)
    sources.models[ref] = SourceModel(
        ref=ref,
        path=str(ckpt.path.resolve()),
        architecture=arch.name,
        num_layers=n,
        dtype=ckpt.dtype(),
        has_weights=ckpt.has_weights,
        revision=revision and revision[0],
    )
    sources.configs[ref] = arch.decoder_config(ckpt.config)
    sources.tensors[ref] = tensors
    sources.layers[ref] = per_layer
    sources.where[ref] = path
    return ref


def open_base(recipe: Recipe, problems: Problems, access: Access = DEFAULT_ACCESS) -> Sources:
    """The base model and its architecture; raises (located at base_model) when either is unusable."""
    base = _open(recipe.base_model, ("base_model",), problems, access)
    problems.raise_if_any()
    try:
        arch = find_architecture(base.config, base.tensors)
    except ArchError as exc:
        problems.add(("base_model",), str(exc))
        problems.raise_if_any()
    sources = Sources(arch=arch, base=str(recipe.base_model), base_config=base.config, access=access)
    if arch.inferred:
        declared = base.config.get("architectures") or ["?"]
        sources.warnings.append(
            f"{declared[0]} has no definition; {arch.notes}. Layer tensors of no recognised "
            "projection are copied; check the result with `tli-recipe verify`"
        )
    if not base.has_weights:
        sources.warnings.append(
            f"{base.path} holds no safetensors weights: tensor shapes were derived from config.json "
            f"with the {arch.name} definition; `run` needs the weights"
        )
    add_source(sources, recipe.base_model, ("base_model",), problems, base)
    problems.raise_if_any()
    return sources


def resolve_sources(recipe: Recipe, problems: Problems, access: Access = DEFAULT_ACCESS) -> Sources:
    """Every source checkpoint, checked, and the stack: the slices, or every base layer once.

    Problems of the slices are added to ``problems`` (not raised): the caller raises once the
    checks that do not need the stack have run too."""
    sources = open_base(recipe, problems, access)
    if recipe.slices is None:
        sources.stack = [(sources.base, i, None) for i in range(sources.base_layers)]
        return sources
    bound = MAX_GROWTH * sources.base_layers
    total = sum(end - start for start, end in (piece.layer_range for piece in recipe.slices))
    if total > bound:
        problems.add(
            ("slices",),
            f"the slices stack {total} layers; expected at most {bound} "
            f"({MAX_GROWTH}x the {sources.base_layers} layers of base_model)",
        )
        return sources
    for i, piece in enumerate(recipe.slices):
        ref = piece.model or recipe.base_model
        key = add_source(sources, ref, ("slices", i, "model") if piece.model else ("base_model",), problems)
        if key is None:
            continue
        start, end = piece.layer_range
        n = sources.models[key].num_layers
        if end > n:
            problems.add(
                ("slices", i, "layer_range"),
                f"[{start}, {end}] ends past the {n} layers of {ref}; expected end <= {n} (half-open range)",
            )
            continue
        sources.stack += [(key, layer, i) for layer in range(start, end)]
    return sources
