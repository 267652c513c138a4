"""Architecture definitions: tensor-name templates, projections and per-layer config lists.

Knowledge of an architecture lives in a data file under ``_data/architectures/``;
this module loads those files and answers questions about tensor names. Layer keys
are matched by a regular expression built from the layer prefix template, so the
layer index is always one whole path segment (``layers.1.`` never matches ``layers.10.``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping, Optional

import yaml

from tli_recipe.source.moe import UpcycleSpec, parse_upcycle
from tli_recipe.source.rules import ArchError, config_value, evaluate, evaluate_rule

__all__ = [
    "ArchError",
    "Architecture",
    "Module",
    "Projection",
    "evaluate",
    "evaluate_rule",
    "find_architecture",
    "infer_architecture",
    "load_architectures",
]


# --- definitions -----------------------------------------------------------------------

_INDEX = r"(?:0|[1-9][0-9]*)"  # a layer or expert index: one whole path segment, no leading zeros


@dataclass(frozen=True)
class Module:
    """One spelling of a projection: a module path under the layer prefix, with its weight shape."""

    path: str  # e.g. "self_attn.o_proj" or "mlp.experts.{expert}.down_proj"
    shape: tuple  # weight shape expressions
    bias: Any = 0  # expression: does the module have a bias?
    when: Any = 1  # expression over config + `layer`: does this layer have it?
    experts: Any = None  # expression: how many experts fill {expert}


@dataclass(frozen=True)
class Projection:
    name: str
    modules: tuple[Module, ...]
    norm: bool = False  # a norm gain (policies such as zero_gain apply)


def _compile_module(path: str) -> re.Pattern:
    return re.compile("^" + re.escape(path).replace(re.escape("{expert}"), _INDEX) + r"\.[^.]+$")


@dataclass(frozen=True)
class Architecture:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_prefixes: tuple[str, ...]  # ("model.layers.{layer}.", ...): the first that the checkpoint uses
    defaults: dict[str, Any]
    tensors: dict[str, dict]  # non-layer tensors: name -> {shape, when, group}
    projections: dict[str, Projection]
    identity_branches: dict[str, tuple[dict[str, str], ...]]  # branch -> options that make it add zero
    recommended_init: dict[str, str]
    norm_offset: float = 0.0  # a norm multiplies by (offset + weight): Gemma stores 1 + w
    per_layer_lists: tuple[str, ...] = ()
    derived_lists: dict[str, str] = field(default_factory=dict)  # list key -> expression over config + `layer`
    derived_from: dict[str, tuple[str, ...]] = field(default_factory=dict)  # list key -> config keys its rule reads
    index_lists: dict[str, str] = field(default_factory=dict)  # key listing layer indices -> membership expression
    index_list_resets: dict[str, Any] = field(default_factory=dict)  # keys set when index lists are rewritten
    config_path: tuple[str, ...] = ()  # where the decoder's config lives (("text_config",) for a VLM)
    num_layers_key: str = ""  # the decoder config key holding the layer count
    vocab_key: str = ""  # the decoder config key holding the vocabulary size
    layers_pattern: str = ""  # the peft layers_pattern: the module list holding the decoder layers
    upcycle: Optional[UpcycleSpec] = None  # sparse upcycling into this (MoE) architecture
    loaded_names: tuple[tuple[str, str], ...] = ()  # (regex, replacement): a checkpoint name as transformers loads it
    notes: str = ""
    source_file: str = ""
    inferred: bool = False  # built from tensor names, not from a definition file
    layer_prefix: str = ""  # the prefix in use (set by for_checkpoint)
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)
    _module_res: tuple = field(init=False, repr=False, compare=False)
    _projections_of: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = self.layer_prefix or self.layer_prefixes[0]
        object.__setattr__(self, "layer_prefix", prefix)
        head, sep, tail = prefix.partition("{layer}")
        if not sep:
            raise ArchError(f"{self.source_file}: layer prefix {prefix!r} has no {{layer}} placeholder")
        object.__setattr__(
            self, "_layer_re", re.compile("^" + re.escape(head) + f"({_INDEX})" + re.escape(tail) + "(.+)$")
        )
        object.__setattr__(self, "_projections_of", {})
        object.__setattr__(
            self,
            "_module_res",
            tuple((proj.name, _compile_module(m.path)) for proj in self.projections.values() for m in proj.modules),
        )

    def for_checkpoint(self, names: Iterable[str]) -> "Architecture":
        """This definition with the layer prefix that the checkpoint's tensor names use."""
        names = list(names)
        for prefix in self.layer_prefixes:
            candidate = replace(self, layer_prefix=prefix)
            if any(candidate.split_layer_key(n) for n in names):
                return candidate
        return self

    # names -------------------------------------------------------------------------
    def layer_key(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer) + suffix

    def split_layer_key(self, name: str) -> Optional[tuple[int, str]]:
        """``model.layers.12.mlp.down_proj.weight`` -> ``(12, "mlp.down_proj.weight")``; None outside layers."""
        match = self._layer_re.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def projection_of(self, suffix: str) -> Optional[str]:
        """The projection a layer tensor belongs to: ``mlp.down_proj.bias`` and
        ``mlp.experts.7.down_proj.weight`` -> ``down_proj``; None for tensors of no projection."""
        cache = self._projections_of
        if suffix not in cache:  # suffixes repeat in every layer: match each one once
            cache[suffix] = next((name for name, pattern in self._module_res if pattern.match(suffix)), None)
        return cache[suffix]

    def loaded_name(self, name: str) -> str:
        """A checkpoint tensor's parameter name once transformers loaded the model (experts fused per layer)."""
        for pattern, replacement in self.loaded_names:
            name = re.sub(pattern, replacement, name)
        return name

    def is_expert_tensor(self, suffix: str) -> bool:
        """True for a tensor of one MoE expert (``mlp.experts.7.down_proj.weight``)."""
        return any(
            m.experts is not None and _compile_module(m.path).match(suffix)
            for proj in self.projections.values()
            for m in proj.modules
        )

    @property
    def linear_projections(self) -> list[str]:
        """The projections that are linear layers (LoRA can target them): every one that is not a norm."""
        return [name for name, proj in self.projections.items() if not proj.norm]

    def offset_of(self, projection: str) -> float:
        return self.norm_offset if self.projections[projection].norm else 0.0

    # config.json ---------------------------------------------------------------------
    def decoder_config(self, config: Mapping[str, Any]) -> dict:
        """The part of config.json that describes the decoder (a VLM nests it in text_config)."""
        for key in self.config_path:
            config = config.get(key) or {}
            if not isinstance(config, Mapping):
                raise ArchError(
                    f"config.json {key} is {config_value(config)}; expected the decoder's config as a mapping"
                )
        return dict(config)

    def names(self, config: Mapping[str, Any]) -> dict[str, Any]:
        values = {
            k: v
            for k, v in self.decoder_config(config).items()
            if isinstance(v, (int, float, bool, str, list)) or v is None
        }
        for key, expr in self.defaults.items():
            if values.get(key) is None:
                values[key] = evaluate_rule(expr, values, key)
        return values

    def derive_list(self, key: str, config: Mapping[str, Any], num_layers: int) -> Optional[list]:
        """A per-layer list that the config leaves implicit, computed as transformers would."""
        expr = self.derived_lists.get(key)
        if expr is None:
            return None
        names = self.names(config)
        return [evaluate_rule(expr, {**names, "layer": i}, key) for i in range(num_layers)]

    def layer_flags(
        self, expr: str, config: Mapping[str, Any], num_layers: int, what: str = "the layer list"
    ) -> list[bool]:
        names = self.names(config)
        return [bool(evaluate_rule(expr, {**names, "layer": i}, what)) for i in range(num_layers)]

    def expected_tensors(self, config: Mapping[str, Any], num_layers: int) -> dict[str, tuple[int, ...]]:
        """Every decoder tensor a checkpoint of this architecture has, with its shape, from config.json alone."""
        names = self.names(config)
        try:
            out: dict[str, tuple[int, ...]] = {}
            for tensor, spec in self.tensors.items():
                if evaluate_rule(spec.get("when", 1), names, tensor):
                    out[tensor] = tuple(int(evaluate_rule(e, names, tensor)) for e in spec["shape"])
            for layer in range(num_layers):
                scope = {**names, "layer": layer}
                for proj in self.projections.values():
                    for m in proj.modules:
                        if not evaluate_rule(m.when, scope, m.path):
                            continue
                        shape = tuple(int(evaluate_rule(e, scope, m.path)) for e in m.shape)
                        count = int(evaluate_rule(m.experts, scope, m.path)) if m.experts is not None else None
                        for e in range(count) if count is not None else [None]:
                            path = m.path.replace("{expert}", str(e)) if e is not None else m.path
                            out[self.layer_key(layer, path + ".weight")] = shape
                            if evaluate_rule(m.bias, scope, m.path):
                                out[self.layer_key(layer, path + ".bias")] = shape[:1]
                        break  # the first spelling that applies is the one a checkpoint has
            return out
        except KeyError as exc:
            raise ArchError(
                f"config.json has no '{exc.args[0]}', which the {self.name} definition needs for tensor shapes"
            ) from None
        except (TypeError, ValueError):
            raise ArchError(
                f"config.json holds a non-integer tensor width, which the {self.name} definition needs for "
                "tensor shapes; expected integer sizes (hidden_size, intermediate_size, ...)"
            ) from None


# The shipped definitions are parsed on every `plan`: libyaml's parser where PyYAML has it (five times
# faster than the pure-Python one, which is the fallback; both are safe loaders).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_file(path: str, text: str) -> dict:
    data = yaml.load(text, Loader=_LOADER)
    if not isinstance(data, dict) or "name" not in data:
        raise ArchError(f"{path}: an architecture definition must be a mapping with a name")
    data["source_file"] = path
    return data


def _projection(name: str, spec: Any, path: str) -> Projection:
    """``{module, shape, bias}`` or ``{modules: [...]}`` -> Projection."""
    entries = spec.get("modules") if isinstance(spec, dict) and "modules" in spec else [spec]
    modules = []
    for entry in entries:
        if not isinstance(entry, dict) or "module" not in entry or "shape" not in entry:
            raise ArchError(f"{path}: projection {name!r} needs module and shape")
        modules.append(
            Module(
                path=entry["module"],
                shape=tuple(entry["shape"]),
                bias=entry.get("bias", 0),
                when=entry.get("when", 1),
                experts=entry.get("experts"),
            )
        )
    return Projection(
        name=name, modules=tuple(modules), norm=bool(spec.get("norm", False)) if isinstance(spec, dict) else False
    )


def _required(data: dict, key: str, path: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ArchError(f"{path}: {key} must be a non-empty string (set in the definition or the one it extends)")
    return value


_MERGED = (
    "defaults",
    "tensors",
    "projections",
    "derived_lists",
    "identity_branches",
    "index_lists",
    "index_list_resets",
)


@lru_cache(maxsize=1)
def load_architectures() -> dict[str, Architecture]:
    """All shipped definitions, by name (``extends`` merges a parent's mappings; ``drop`` removes entries)."""
    folder = resources.files("tli_recipe") / "_data" / "architectures"
    raw = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = _load_file(f"tli_recipe/_data/architectures/{entry.name}", entry.read_text(encoding="utf-8"))
            raw[data["name"]] = data

    def resolved(name: str, seen: tuple = ()) -> dict:
        data = dict(raw[name])
        parent = data.pop("extends", None)
        if parent is None:
            return data
        if parent not in raw or parent in seen:
            raise ArchError(f"{data['source_file']}: extends unknown or circular definition {parent!r}")
        base = resolved(parent, seen + (name,))
        merged = {**base, **data}
        for key in _MERGED:
            merged[key] = {**base.get(key, {}), **data.get(key, {})}
        for key, names in (data.get("drop") or {}).items():
            merged[key] = {k: v for k, v in merged[key].items() if k not in names}
        return merged

    out = {}
    for name in raw:
        d = resolved(name)
        path = d["source_file"]
        projections = {k: _projection(k, v, path) for k, v in d.get("projections", {}).items()}
        branches = {b: tuple(dict(o) for o in options) for b, options in d.get("identity_branches", {}).items()}
        for branch, options in branches.items():
            for option in options:
                unknown = [p for p in option if p not in projections]
                if unknown:
                    raise ArchError(f"{path}: identity branch {branch!r} names unknown projections {unknown}")
        prefixes = d.get("layer_prefix")
        out[name] = Architecture(
            name=d["name"],
            architectures=tuple(d.get("architectures", ())),
            model_types=tuple(d.get("model_types", ())),
            layer_prefixes=tuple(prefixes if isinstance(prefixes, list) else [prefixes]),
            defaults=dict(d.get("defaults", {})),
            tensors={k: dict(v) for k, v in d.get("tensors", {}).items()},
            projections=projections,
            identity_branches=branches,
            recommended_init=dict(
                d.get("recommended_init") or {p: k for opts in branches.values() for p, k in opts[0].items()}
            ),
            norm_offset=float(d.get("norm_offset", 0)),
            per_layer_lists=tuple(d.get("per_layer_lists", ())),
            derived_lists={k: v["rule"] if isinstance(v, dict) else v for k, v in d.get("derived_lists", {}).items()},
            derived_from={
                k: tuple(v.get("from", ())) for k, v in d.get("derived_lists", {}).items() if isinstance(v, dict)
            },
            index_lists=dict(d.get("index_lists", {})),
            index_list_resets=dict(d.get("index_list_resets", {})),
            config_path=tuple(d.get("config_path", ())),
            num_layers_key=_required(d, "num_layers_key", path),
            vocab_key=_required(d, "vocab_key", path),
            layers_pattern=_required(d, "layers_pattern", path),
            upcycle=parse_upcycle(d.get("upcycle"), path),
            loaded_names=tuple((str(a), str(b)) for a, b in d.get("loaded_names") or ()),
            notes=str(d.get("notes", "")).strip(),
            source_file=path,
        )
    return out


def find_architecture(config: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> Architecture:
    """The definition for a config.json (by ``architectures`` then ``model_type``), with the layer
    prefix its tensors use; an unknown architecture is inferred from tensor names when possible."""
    archs = load_architectures()
    names = list(tensor_names)
    declared = config.get("architectures") or []
    if not isinstance(declared, list) or not all(isinstance(a, str) for a in declared):
        raise ArchError(
            f"config.json architectures is {config_value(declared)}; expected a list of model class "
            'names such as ["LlamaForCausalLM"]'
        )
    for arch in archs.values():
        if any(a in arch.architectures for a in declared):
            return arch.for_checkpoint(names)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ArchError(f'config.json model_type is {config_value(model_type)}; expected a string such as "llama"')
    for arch in archs.values():
        if model_type in arch.model_types:
            return arch.for_checkpoint(names)
    what = declared[0] if declared else f"model_type {model_type!r}"
    if names:
        inferred = infer_architecture(what, names)
        if inferred is not None:
            return inferred
    known = sorted(a for arch in archs.values() for a in arch.architectures)
    raise ArchError(
        f"architecture {what} has no definition"
        f"{' and its layer structure could not be inferred from the tensor names' if names else ''}; "
        f"supported: {', '.join(known)}. To add one, write a data file in tli_recipe/_data/architectures/ "
        "(docs/architectures.md: Adding an architecture)"
    )


_LAYER_GUESS = re.compile(r"^(.*?\b(layers|layer|h|blocks|block|decoder_layers)\.)(" + _INDEX + r")\.(.+)$")


def infer_architecture(what: str, names: list[str]) -> Optional[Architecture]:
    """A definition guessed from tensor names: the most common ``<prefix>.<N>.`` run is the layer
    stack; a tensor whose module is named like a projection of any definition (``o_proj``,
    ``down_proj``, ``router``...) belongs to it. Returns None when no layer stack is found."""
    archs = load_architectures()
    known = {p for arch in archs.values() for p in arch.projections}
    counts: dict[str, set[int]] = {}
    pattern_of: dict[str, str] = {}
    for n in names:
        m = _LAYER_GUESS.match(n)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(3)))
            pattern_of[m.group(1)] = m.group(2)
    if not counts:
        return None
    head = max(counts, key=lambda k: len(counts[k]))
    prefix = head + "{layer}."
    suffixes = sorted({m.group(4) for n in names if (m := _LAYER_GUESS.match(n)) and m.group(1) == head})
    modules: dict[str, set[str]] = {}
    for suffix in suffixes:
        module = suffix.rsplit(".", 1)[0]
        leaf = module.rsplit(".", 1)[-1]
        if leaf in known:
            modules.setdefault(leaf, set()).add(re.sub(r"\.(?:0|[1-9][0-9]*)\.", ".{expert}.", module))
    projections = {
        p: Projection(p, tuple(Module(path=m, shape=()) for m in sorted(ms)), norm="norm" in p)
        for p, ms in modules.items()
    }
    # Both branches are always checked: a branch whose output projection was not recognised
    # cannot be shown to add zero, so such a plan is never called function-preserving.
    branches = {"attention": ({"o_proj": "zero"},), "mlp": ({"down_proj": "zero"},)}
    # Config keys follow the Hugging Face conventions that the llama definition states.
    conventions = archs["llama"]
    return Architecture(
        name=f"inferred:{what}",
        architectures=(what,),
        model_types=(),
        layer_prefixes=(prefix,),
        defaults={},
        tensors={},
        projections=projections,
        identity_branches=branches,
        recommended_init={p: "zero" for p in ("o_proj", "down_proj") if p in projections},
        num_layers_key=conventions.num_layers_key,
        vocab_key=conventions.vocab_key,
        layers_pattern=pattern_of[head],
        notes=(
            f"inferred from tensor names: layer prefix {prefix!r}, projections "
            f"{', '.join(sorted(projections)) or 'none'}"
        ),
        source_file="(inferred)",
        inferred=True,
    )
