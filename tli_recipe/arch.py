"""Architecture definitions: tensor-name templates, projections and per-layer config lists.

Knowledge of an architecture lives in a data file under ``_data/architectures/``;
this module loads those files and answers questions about tensor names. Layer keys
are matched by a regular expression built from the layer prefix template, so the
layer index is always one whole path segment (``layers.1.`` never matches ``layers.10.``).
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Optional

import yaml

from .errors import TliError


class ArchError(TliError):
    """No definition fits a checkpoint, or a definition file is broken."""


# --- shape expressions ---------------------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}


def evaluate(expr: Any, names: Mapping[str, Any]) -> Any:
    """Evaluate a shape or condition expression over config values.

    Allowed: numbers, quoted strings, config key names, ``+ - * //``, comparisons,
    ``and``/``or``/``not``, ``x if cond else y`` and parentheses. Nothing else, so a
    definition file cannot run code.
    """
    if isinstance(expr, (int, float, bool)) or expr is None:
        return expr

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise KeyError(node.id)
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not walk(node.operand)
        if isinstance(node, ast.BoolOp):
            values = [walk(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](walk(node.left), walk(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return walk(node.body) if walk(node.test) else walk(node.orelse)
        raise ValueError(f"unsupported expression {ast.dump(node)}")

    return walk(ast.parse(str(expr), mode="eval"))


# --- definitions -----------------------------------------------------------------------

@dataclass(frozen=True)
class Projection:
    name: str
    module: str                      # path under the layer prefix, e.g. "self_attn.o_proj"
    shape: tuple                     # weight shape expressions
    bias: Any = 0                    # expression: does the module have a bias?


@dataclass(frozen=True)
class Architecture:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_prefix: str                # "model.layers.{layer}."
    defaults: dict[str, Any]
    tensors: dict[str, dict]         # non-layer tensors: name -> {shape, when}
    projections: dict[str, Projection]
    function_preserving_init: dict[str, str]
    per_layer_lists: tuple[str, ...] = ()
    derived_lists: dict[str, str] = field(default_factory=dict)  # list key -> expression over config + `layer`
    source_file: str = ""
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head, sep, tail = self.layer_prefix.partition("{layer}")
        if not sep:
            raise ArchError(f"{self.source_file}: layer_prefix {self.layer_prefix!r} has no {{layer}} placeholder")
        object.__setattr__(self, "_layer_re", re.compile("^" + re.escape(head) + r"(0|[1-9][0-9]*)" + re.escape(tail) + "(.+)$"))

    # names -------------------------------------------------------------------------
    def layer_key(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(layer=layer) + suffix

    def split_layer_key(self, name: str) -> Optional[tuple[int, str]]:
        """``model.layers.12.mlp.down_proj.weight`` -> ``(12, "mlp.down_proj.weight")``; None outside layers."""
        match = self._layer_re.match(name)
        return (int(match.group(1)), match.group(2)) if match else None

    def projection_of(self, suffix: str) -> Optional[str]:
        """The projection a layer tensor belongs to (``mlp.down_proj.bias`` -> ``down_proj``), or None."""
        for proj in self.projections.values():
            if suffix.startswith(proj.module + ".") and "." not in suffix[len(proj.module) + 1:]:
                return proj.name
        return None

    # shapes from config.json ----------------------------------------------------------
    def names(self, config: Mapping[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in config.items() if isinstance(v, (int, float, bool)) or v is None}
        for key, expr in self.defaults.items():
            if values.get(key) is None:
                values[key] = evaluate(expr, values)
        return values

    def derive_list(self, key: str, config: Mapping[str, Any], num_layers: int) -> Optional[list]:
        """A per-layer list that the config leaves implicit, computed as transformers would."""
        expr = self.derived_lists.get(key)
        if expr is None:
            return None
        names = self.names(config)
        return [evaluate(expr, {**names, "layer": i}) for i in range(num_layers)]

    def expected_tensors(self, config: Mapping[str, Any], num_layers: int) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this architecture has, with its shape, from config.json alone."""
        names = self.names(config)
        try:
            out: dict[str, tuple[int, ...]] = {}
            for tensor, spec in self.tensors.items():
                if evaluate(spec.get("when", 1), names):
                    out[tensor] = tuple(int(evaluate(e, names)) for e in spec["shape"])
            for layer in range(num_layers):
                for proj in self.projections.values():
                    shape = tuple(int(evaluate(e, names)) for e in proj.shape)
                    out[self.layer_key(layer, proj.module + ".weight")] = shape
                    if evaluate(proj.bias, names):
                        out[self.layer_key(layer, proj.module + ".bias")] = shape[:1]
            return out
        except KeyError as exc:
            raise ArchError(f"config.json has no '{exc.args[0]}', which the {self.name} definition needs for tensor shapes") from None


def _load_file(path: str, text: str) -> dict:
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "name" not in data:
        raise ArchError(f"{path}: an architecture definition must be a mapping with a name")
    data["source_file"] = path
    return data


@lru_cache(maxsize=1)
def load_architectures() -> dict[str, Architecture]:
    """All shipped definitions, by name (``extends`` merges a parent's mappings)."""
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
        for key in ("defaults", "tensors", "projections", "function_preserving_init", "derived_lists"):
            merged[key] = {**base.get(key, {}), **data.get(key, {})}
        return merged

    out = {}
    for name in raw:
        d = resolved(name)
        out[name] = Architecture(
            name=d["name"],
            architectures=tuple(d.get("architectures", ())),
            model_types=tuple(d.get("model_types", ())),
            layer_prefix=d["layer_prefix"],
            defaults=dict(d.get("defaults", {})),
            tensors={k: dict(v) for k, v in d.get("tensors", {}).items()},
            projections={k: Projection(name=k, module=v["module"], shape=tuple(v["shape"]), bias=v.get("bias", 0))
                         for k, v in d.get("projections", {}).items()},
            function_preserving_init=dict(d.get("function_preserving_init", {})),
            per_layer_lists=tuple(d.get("per_layer_lists", ())),
            derived_lists=dict(d.get("derived_lists", {})),
            source_file=d["source_file"],
        )
    return out


def find_architecture(config: Mapping[str, Any]) -> Architecture:
    """The definition for a config.json, by ``architectures[0]`` then ``model_type``."""
    archs = load_architectures()
    declared = list(config.get("architectures") or [])
    for arch in archs.values():
        if any(a in arch.architectures for a in declared):
            return arch
    model_type = config.get("model_type")
    for arch in archs.values():
        if model_type in arch.model_types:
            return arch
    known = sorted(a for arch in archs.values() for a in arch.architectures)
    what = declared[0] if declared else f"model_type {model_type!r}"
    raise ArchError(
        f"architecture {what} has no definition; supported: {', '.join(known)}. "
        "To add one, write a data file in tli_recipe/_data/architectures/ (see README: Adding an architecture)"
    )
