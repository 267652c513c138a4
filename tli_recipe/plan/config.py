"""The output config.json: layer count, per-layer lists and index lists follow the layer map.
"""

from __future__ import annotations

import json
from typing import Any

from tli_recipe.errors import TliError
from tli_recipe.plan.model import ConfigChange, LayerEntry
from tli_recipe.source.arch import Architecture


def output_config(config: dict, configs: dict[str, dict], arch: Architecture, layers: list[LayerEntry], n_before: int,
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
