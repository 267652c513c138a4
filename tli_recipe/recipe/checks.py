"""Checks of a validated recipe that need no checkpoint: ``(field path, message)`` pairs that the
loader locates with the recipe's marks. Checks that need the checkpoint run in ``plan/``."""

from __future__ import annotations

from typing import Any

from tli_recipe.recipe.schema import Inject, Recipe, Upcycle


def recipe_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Cross-field checks that need no checkpoint: ``(field path, message)`` pairs."""
    problems: list[tuple[tuple, str]] = []
    if recipe.inject is not None:
        problems += _one_site(recipe.inject)
    if recipe.upcycle is not None:
        problems += _upcycle_problems(recipe.upcycle, recipe.inject is not None)
    seen: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            problems.append(
                (
                    ("stages", i, "name"),
                    f"duplicate stage name '{stage.name}' (also stages[{seen[stage.name]}]); expected unique names",
                )
            )
        seen.setdefault(stage.name, i)
        groups = [s for s in stage.trainable if isinstance(s, str)]
        for j, sel in enumerate(stage.trainable):
            if sel == "all" and len(stage.trainable) > 1:
                problems.append((("stages", i, "trainable", j), "'all' already selects every layer; expected it alone"))
        if "injected" in groups and recipe.inject is None:
            problems.append(
                (
                    ("stages", i, "trainable", stage.trainable.index("injected")),
                    "'injected' selects nothing: the recipe has no inject section; add inject or pick another group",
                )
            )
        if stage.lora is not None and len(set(stage.lora.targets)) != len(stage.lora.targets):
            problems.append((("stages", i, "lora", "targets"), "a projection is listed twice; expected each once"))
        if stage.mod is not None and stage.objective != "mod":
            problems.append(
                (
                    ("stages", i, "mod"),
                    "mod settings without objective: mod; expected objective: mod beside them, or no mod",
                )
            )
        if stage.max_steps is not None and stage.epochs is not None:
            problems.append(
                (
                    ("stages", i, "epochs"),
                    f"both max_steps ({stage.max_steps}) and epochs ({stage.epochs:g}) are given; expected one of them",
                )
            )
    return problems


#: output_config keys that belong to the source (model_type, architectures) or to the plan (the layer
#: count and the per-layer lists it rewrites), at the top level and under text_config. auto_map is refused
#: at any depth: it makes transformers import Python code named by the config.
SOURCE_KEYS = ("model_type", "architectures")
PLAN_KEYS = ("num_hidden_layers", "requires_grad_layers", "layer_types")
PROTECTED_CONFIG_KEYS = frozenset({*SOURCE_KEYS, *PLAN_KEYS} | {f"text_config.{k}" for k in (*SOURCE_KEYS, *PLAN_KEYS)})


def output_config_problems(output_config: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Static checks of output_config: ``(path, message)`` to be located at the key (the path is
    ``("output_config", key, nested keys...)`` as written)."""
    problems: list[tuple[tuple, str]] = []
    todo = [(("output_config", key), [key], value) for key, value in output_config.items()]
    while todo:  # iterative: nesting is bounded by the loader, but a walk needs no recursion
        path, dotted, value = todo.pop(0)
        segments = [s for part in dotted for s in str(part).split(".")]
        name = ".".join(segments)
        if "" in segments:
            problems.append(
                (
                    path,
                    f"'{path[-1]}' has an empty key segment; expected dotted names such as text_config.sliding_window",
                )
            )
        elif "auto_map" in segments:
            problems.append(
                (
                    path,
                    "output_config cannot set or remove auto_map: it makes transformers run Python code the "
                    "config names; remove the key",
                )
            )
        elif name in PROTECTED_CONFIG_KEYS:
            owner = "the source checkpoint" if segments[-1] in SOURCE_KEYS else "the plan (it follows the layer map)"
            problems.append((path, f"{name} belongs to {owner}; output_config cannot set or remove it; remove the key"))
        elif name == "text_config":  # a value here replaces the decoder's whole config, layer count included
            problems.append(
                (
                    path,
                    "output_config cannot replace or remove text_config as a whole (it holds the decoder's "
                    "layer count); expected single keys such as text_config.sliding_window",
                )
            )
        elif isinstance(value, dict):
            todo += [(path + (k,), dotted + [k], v) for k, v in value.items()]
    return problems


# One injection site, exactly: checked here so the message points at inject.
def _one_site(inject: Inject) -> list[tuple[tuple, str]]:
    given = [k for k in ("every", "after", "between") if getattr(inject, k) is not None]
    if len(given) != 1:
        what = "none of them" if not given else ", ".join(given)
        return [(("inject",), f"got {what}; expected exactly one of every, after, between")]
    return []


def _upcycle_problems(up: Upcycle, has_inject: bool) -> list[tuple[tuple, str]]:
    """upcycle's cross-field checks: top_k, per-expert lists, the hidden router's prompts."""
    problems: list[tuple[tuple, str]] = []
    if up.top_k > up.experts:
        problems.append(
            (("upcycle", "top_k"), f"{up.top_k} is more than the {up.experts} experts; expected top_k <= experts")
        )
    if isinstance(up.init, list) and len(up.init) != up.experts:
        problems.append(
            (
                ("upcycle", "init"),
                f"lists {len(up.init)} policies for {up.experts} experts; expected one policy, or one per expert",
            )
        )
    if up.router.kind == "hidden" and up.prompts is None:
        problems.append(
            (
                ("upcycle", "router"),
                "hidden needs prompts for each expert; expected upcycle.prompts: "
                "[{positive: [...]}, ...] with one entry per expert",
            )
        )
    if up.prompts is not None and up.router.kind != "hidden":
        problems.append(
            (
                ("upcycle", "prompts"),
                f"prompts are for the hidden router init, and router is {up.router}; "
                "expected router: hidden, or no prompts",
            )
        )
    if up.prompts is not None and len(up.prompts) != up.experts:
        problems.append(
            (
                ("upcycle", "prompts"),
                f"lists {len(up.prompts)} entries for {up.experts} experts; expected one per expert",
            )
        )
    if up.sources is not None and len(up.sources) != up.experts:
        problems.append(
            (
                ("upcycle", "sources"),
                f"lists {len(up.sources)} models for {up.experts} experts; expected one per expert",
            )
        )
    if "injected" in (up.layers or []) and not has_inject:
        problems.append(
            (
                ("upcycle", "layers", up.layers.index("injected")),
                "'injected' selects nothing: the recipe has no inject section; add inject or pick another group",
            )
        )
    return problems


# --- the recipe --------------------------------------------------------------------
