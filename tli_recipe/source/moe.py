"""What an MoE architecture definition says about sparse upcycling into it (its ``upcycle:`` section):
the dense model types it is the sibling of, and the config keys that describe its experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tli_recipe.source.rules import ArchError


@dataclass(frozen=True)
class UpcycleSpec:
    from_types: tuple[str, ...]  # dense model_types this architecture is the natural MoE sibling of
    experts_key: str  # config key of the expert count
    top_k_key: str  # config key of the experts per token
    expert_width_key: Optional[str]  # config key of an expert's width (None: intermediate_size)
    dense_layers_key: Optional[str]  # config key listing layers that stay dense (None: every layer is sparse)
    renormalised: Any  # expression over the output config: are top-k weights renormalised to 1?
    requires: dict[str, str] = field(default_factory=dict)  # expression over the source config -> why it must hold
    set: dict[str, Any] = field(default_factory=dict)  # output config keys written by the upcycle
    aux_loss: dict[str, Any] = field(default_factory=dict)  # router loss keys: kept from the source, else these
    shared_experts: bool = False  # the architecture has shared experts (the `shared` stage group)


def parse_upcycle(data: Any, path: str) -> Optional[UpcycleSpec]:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("from"), list):
        raise ArchError(f"{path}: upcycle must be a mapping with a list `from` of dense model types")
    for key in ("experts_key", "top_k_key"):
        if not isinstance(data.get(key), str):
            raise ArchError(f"{path}: upcycle.{key} must name a config key")
    return UpcycleSpec(
        from_types=tuple(data["from"]),
        experts_key=data["experts_key"],
        top_k_key=data["top_k_key"],
        expert_width_key=data.get("expert_width_key"),
        dense_layers_key=data.get("dense_layers_key"),
        renormalised=data.get("renormalised", 0),
        requires=dict(data.get("requires") or {}),
        set=dict(data.get("set") or {}),
        aux_loss=dict(data.get("aux_loss") or {}),
        shared_experts=bool(data.get("shared_experts", False)),
    )
