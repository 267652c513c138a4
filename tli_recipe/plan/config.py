"""Step 4 of compile_plan: the output config.json. The layer count, per-layer lists and index
lists follow the layer map; the recipe's output_config comes last, except for the keys the
plan owns."""

from __future__ import annotations

import json
from typing import Any, Optional

from tli_recipe.plan.model import ConfigChange, LayerEntry
from tli_recipe.plan.problems import Problems
from tli_recipe.source.arch import ArchError, Architecture

#: How many values of a rule key are tried for a hint that reproduces a grown list: enough
#: for every real threshold or period, and the work stays linear in the output size.
HINT_CANDIDATES = 512

#: Keys that decide which model code loads the checkpoint: output_config must not change them.
FOREIGN_KEYS = ("model_type", "architectures")


class _Rewrite:
    """The output config being built, and the changes made to it."""

    def __init__(self, config: dict, arch: Architecture) -> None:
        self.out = json.loads(json.dumps(config))
        self.decoder = self.out
        for key in arch.config_path:
            self.decoder = self.decoder.setdefault(key, {})
        self.dotted = "".join(f"{k}." for k in arch.config_path)
        self.changes: list[ConfigChange] = []
        self.blocking: list[str] = []

    def change(self, key: str, after: Any, why: str, where: Optional[dict] = None, name: Optional[str] = None) -> None:
        where = self.decoder if where is None else where
        if where.get(key) != after:
            self.changes.append(
                ConfigChange(key=name or self.dotted + key, before=where.get(key), after=after, why=why)
            )
            where[key] = after


def owned_keys(arch: Architecture) -> set[str]:
    """Config keys (dotted from the root of config.json) that the plan writes from the layer map."""
    dotted = "".join(f"{k}." for k in arch.config_path)
    decoder = {
        arch.num_layers_key,
        *arch.per_layer_lists,
        *arch.derived_lists,
        *arch.index_lists,
        *arch.index_list_resets,
    }
    return {dotted + key for key in decoder} | {"requires_grad_layers"}


def _grown_lists(
    rw: _Rewrite,
    configs: dict[str, dict],
    arch: Architecture,
    layers: list[LayerEntry],
    overrides: dict[str, Any],
    fail,
) -> set[str]:
    """Each per-layer list: every output layer takes the entry of its own source layer."""
    handled: set[str] = set()
    for key in sorted(set(arch.per_layer_lists) | set(arch.derived_lists)):
        per_source, derived = {}, False
        for ref, cfg in configs.items():
            n = cfg[arch.num_layers_key]
            values = cfg.get(key)
            if values is None:
                try:
                    values = arch.derive_list(key, cfg, n)
                except ArchError as exc:  # a rule the config's values cannot feed (a period of 0, a string)
                    return fail(ref, f"{ref}: {exc}")
                derived = derived or values is not None
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != n:
                return fail(
                    ref,
                    f"{ref}: config.json {key} has {len(values) if isinstance(values, list) else 'no list of'} "
                    f"entries for {n} layers; the config is inconsistent",
                )
            per_source[ref] = values
        if not per_source:
            continue
        handled.add(key)
        missing = sorted({e.source for e in layers} - set(per_source))
        if missing:
            return fail(
                missing[0],
                f"{missing[0]}: config.json has no {key}, which the base model's config has; "
                "expected slices of models with the same config layout",
            )
        grown = [per_source[e.source][e.layer] for e in layers]
        rw.change(
            key,
            grown,
            ("derived from the config as transformers does, then " if derived else "")
            + "re-indexed by the layer map (an injected layer takes its source's entry)",
        )
        _block_stale_rules(rw, arch, key, grown, len(layers), overrides, handled)
    return handled


def _block_stale_rules(
    rw: _Rewrite, arch: Architecture, key: str, grown: list, n: int, overrides: dict[str, Any], handled: set[str]
) -> None:
    """A rule key (a threshold, a period) that would now derive a different list no longer
    describes the stack: transformers reads the explicit list, other tools may read the rule."""
    decoder, dotted = rw.decoder, rw.dotted
    rule_keys = [k for k in arch.derived_from.get(key, ()) if k in decoder and k not in handled]
    if not rule_keys or arch.derive_list(key, decoder, n) == grown:
        return
    for rule_key in rule_keys:
        handled.add(rule_key)
        if rule_key in overrides or dotted + rule_key in overrides:
            continue
        fit = next(
            (
                v
                for v in range(1, min(n, HINT_CANDIDATES) + 1)
                if isinstance(decoder[rule_key], int) and arch.derive_list(key, {**decoder, rule_key: v}, n) == grown
            ),
            None,
        )
        hint = f" ({rule_key}: {fit} reproduces the grown {key})" if fit is not None else ""
        rw.blocking.append(
            f"config.json {dotted}{rule_key}={decoder[rule_key]!r} derives {key} by a rule that the grown stack "
            f"no longer follows ({key} is written explicitly and transformers uses it; other tools may read "
            f"{rule_key}); state the choice in the recipe: output_config: {{{dotted}{rule_key}: null}} to remove it, "
            f"or a value to keep{hint}"
        )


def _index_lists(
    rw: _Rewrite, configs: dict[str, dict], arch: Architecture, layers: list[LayerEntry], handled: set[str], fail
) -> bool:
    for key, expr in arch.index_lists.items():
        flags = {}
        for ref, cfg in configs.items():
            try:
                flags[ref] = arch.layer_flags(expr, cfg, cfg[arch.num_layers_key], key)
            except ArchError as exc:
                return fail(ref, f"{ref}: {exc}")
        listed = [e.output for e in layers if flags[e.source][e.layer]]
        before = rw.decoder.get(key)
        if key in rw.decoder or listed:
            rw.change(key, listed, "layer indices of this kind, re-indexed from each output layer's source")
            if rw.decoder.get(key) != before:
                for reset_key, value in arch.index_list_resets.items():
                    rw.change(reset_key, value, f"{key} now lists every such layer explicitly")
        handled.add(key)
    return True


def check_overrides(
    overrides: dict[str, Any],
    config: dict,
    arch: Architecture,
    problems: Problems,
    upcycle_keys: frozenset = frozenset(),
) -> dict[str, Any]:
    """The output_config entries that may be applied; each one that may not is a located problem."""
    owned = owned_keys(arch)
    dotted = "".join(f"{k}." for k in arch.config_path)
    foreign = set(FOREIGN_KEYS) | {dotted + k for k in FOREIGN_KEYS}
    usable = {}
    for key, value in overrides.items():
        path = ("output_config", key)
        parts = key.split(".")
        if "" in parts:
            problems.add(
                path,
                "has an empty name between dots; expected a dotted key such as text_config.rope_theta",
                prefer_key=True,
            )
        elif key in upcycle_keys:
            problems.add(
                path,
                f"{key} belongs to the plan (the upcycle section sets it); output_config cannot set or "
                "remove it; change upcycle instead",
                prefer_key=True,
            )
        elif key in owned or any(k.startswith(key + ".") for k in owned):
            problems.add(
                path,
                f"{key} belongs to the plan (it follows the layer map); output_config cannot set or "
                "remove it; remove the key",
                prefer_key=True,
            )
        elif any(".".join(parts[:i]) in owned for i in range(1, len(parts))):
            parent = next(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in owned)
            problems.add(
                path,
                f"descends into {parent}, which belongs to the plan (it follows the layer map); "
                "output_config cannot set or remove it; remove the key",
                prefer_key=True,
            )
        elif "auto_map" in parts:
            problems.add(
                path,
                "output_config cannot set or remove auto_map: it makes transformers run Python code the "
                "config names; remove the key",
                prefer_key=True,
            )
        elif key in foreign and _lookup(config, parts) != value:
            problems.add(
                path,
                f"{key} belongs to the source checkpoint; output_config cannot set or remove it; remove the key",
                prefer_key=True,
            )
        else:
            blocked = _non_mapping_parent(config, parts)
            if blocked is not None:
                problems.add(
                    path,
                    f"{blocked} is not a mapping in config.json; expected a dotted key that descends "
                    "only through mappings",
                    prefer_key=True,
                )
            else:
                usable[key] = value
    return usable


_MISSING = object()


def _lookup(config: dict, parts: list[str]) -> Any:
    where: Any = config
    for part in parts:
        if not isinstance(where, dict) or part not in where:
            return _MISSING
        where = where[part]
    return where


def _non_mapping_parent(config: dict, parts: list[str]) -> Optional[str]:
    where: Any = config
    for i, part in enumerate(parts[:-1]):
        where = where.get(part) if isinstance(where, dict) else None
        if where is None:
            return None  # created as a mapping
        if not isinstance(where, dict):
            return ".".join(parts[: i + 1])
    return None


def _apply_overrides(rw: _Rewrite, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():  # the recipe's explicit choices come last
        *parents, leaf = key.split(".")
        where = rw.out
        for parent in parents:
            where = where.setdefault(parent, {})
        if value is None:
            if leaf in where:
                rw.changes.append(
                    ConfigChange(key=key, before=where.pop(leaf), after=None, why="removed by output_config")
                )
        else:
            rw.change(leaf, value, "set by output_config", where, key)


def rewrite_config(
    config: dict,
    configs: dict[str, dict],
    arch: Architecture,
    layers: list[LayerEntry],
    injected: list[int],
    dtype: str,
    overrides: dict[str, Any],
    where: dict[str, tuple],
    problems: Problems,
    moe=None,
) -> tuple[dict, list[ConfigChange], list[str], list[str]]:
    """The output config.json, its changes, what blocks `run` until the recipe chooses, and warnings.

    ``configs`` holds each source's decoder config; the decoder part of the output is nested
    under ``arch.config_path`` for a VLM. A source config that cannot be grown is a problem
    located at that source in the recipe (``where``: source key -> field path). ``moe`` (an upcycle's
    config keys: ``owned`` and ``apply(rw)``) writes the MoE keys before output_config is applied."""
    rw = _Rewrite(config, arch)
    warnings: list[str] = []
    usable = check_overrides(overrides, config, arch, problems, frozenset(moe.owned) if moe else frozenset())

    def fail(ref: str, message: str) -> None:
        problems.add(where.get(ref, ("base_model",)), message)

    rw.change(arch.num_layers_key, len(layers), "layer count of the output stack")
    try:
        handled = _grown_lists(rw, configs, arch, layers, usable, fail)
    except ArchError as exc:  # the output's own rule (base_model's values) cannot be evaluated
        handled = fail(next(iter(configs)), f"{next(iter(configs))}: {exc}")
    if handled is None or not _index_lists(rw, configs, arch, layers, handled, fail):
        return rw.out, rw.changes, rw.blocking, warnings
    n_before = configs[next(iter(configs))][arch.num_layers_key]
    for key, value in rw.decoder.items():
        if (
            key not in handled
            and isinstance(value, list)
            and len(value) == n_before
            and n_before > 2
            and key != "architectures"
        ):
            warnings.append(
                f"config.json: {rw.dotted}{key} has one entry per layer but the {arch.name} definition does not "
                f"list it as a per-layer list; it is left unchanged (add it to per_layer_lists if it is one)"
            )
    if injected or "requires_grad_layers" in rw.out:  # a plan without injected layers writes no empty list
        rw.change(
            "requires_grad_layers",
            injected,
            "output indices of the injected layers (TLI Algorithm 1)",
            rw.out,
            "requires_grad_layers",
        )
    dtype_key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    rw.change(dtype_key, dtype, "dtype of the output tensors", rw.out, dtype_key)
    if moe is not None:
        moe.apply(rw)
    _apply_overrides(rw, usable)
    return rw.out, rw.changes, rw.blocking, warnings
