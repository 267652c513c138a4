"""Step 2 of compile_plan: the output layer map (where each output layer comes from)."""

from __future__ import annotations

from typing import Optional

from tli_recipe.plan.model import LayerEntry
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.sources import MAX_GROWTH
from tli_recipe.recipe.schema import Inject

Stack = list[tuple[str, int, Optional[int]]]  # (source key, source layer, slice index)


def check_injection(inject: Optional[Inject], stack: int, base_layers: int, label: str, problems: Problems) -> bool:
    """Where the recipe injects, checked against a stack of ``stack`` layers; False when the
    output would be too large to build (so nothing is built). ``label`` names the stack."""
    if inject is None:
        return True
    if inject.every is not None and inject.every > stack:
        problems.add(
            ("inject", "every"),
            f"{inject.every} is larger than the {stack} layers of the stack{label}; "
            f"no layer would be injected; expected every <= {stack}",
        )
    for j, position in enumerate(inject.after or []):
        if position >= stack:
            problems.add(
                ("inject", "after", j),
                f"stack position {position} does not exist; expected < {stack} (the stack's layers are 0-based)",
            )
    if inject.between is not None and inject.between[1] > stack:
        problems.add(
            ("inject", "between"),
            f"{list(inject.between)} ends past the {stack} layers of the stack; "
            f"expected end <= {stack} (half-open range)",
        )
    # The output size is known from counts alone: refuse a runaway one before building anything.
    positions = sum(1 for p in inject.positions(stack) if p < stack)
    total, bound = stack + inject.copies * positions, MAX_GROWTH * base_layers
    if total > bound:
        problems.add(
            ("inject", "copies"),
            f"{inject.copies} copies at {positions} positions give {total} output layers; "
            f"expected at most {bound} ({MAX_GROWTH}x the {base_layers} layers of base_model)",
        )
        return False
    return True


def build_layer_map(stack: Stack, inject: Optional[Inject]) -> tuple[list[LayerEntry], list[str]]:
    """The output layers (Algorithm 1: copies after stack position j when (j + 1) % K == 0), and warnings."""
    layers: list[LayerEntry] = []
    positions = set(inject.positions(len(stack))) if inject is not None else set()
    for j, (key, layer, piece) in enumerate(stack):
        layers.append(LayerEntry(output=len(layers), source=key, layer=layer, role="original", slice=piece))
        if j in positions:
            after = stack[j + 1] if j + 1 < len(stack) else (None, None, None)
            for _ in range(inject.copies):
                layers.append(
                    LayerEntry(
                        output=len(layers),
                        source=key,
                        layer=layer,
                        role="injected",
                        slice=piece,
                        next_source=after[0],
                        next_layer=after[1],
                    )
                )
    warnings = []
    if inject is not None and inject.every is not None and len(stack) % inject.every:
        rest = len(stack) % inject.every
        tail = [e.output for e in layers[-rest:]]
        warnings.append(
            f"inject.every={inject.every} does not divide the {len(stack)} layers of the stack: the last {rest} "
            f"(output layers {tail[0]}..{tail[-1]}) have no injected layer after them"
        )
    return layers, warnings
