"""The Plan and its parts: pure data saying what every output tensor is made of.

``tli-recipe plan --json`` prints a Plan; `run` writes it as ``plan.json`` beside the
checkpoint, and everything after (verify, emit, train) reads only that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from tli_recipe.recipe.schema import Lesa, Stage
from tli_recipe.source.checkpoint import nbytes


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
    revision: Optional[str] = Field(
        default=None,
        description=(
            "The commit the directory holds (hub cache snapshot, download metadata or git HEAD); None when unknown."
        ),
    )


class LayerEntry(Frozen):
    """One output layer: where it comes from and what it is."""

    output: int = Field(description="Output layer index, 0-based.")
    source: str = Field(description="Key of the source model in Plan.sources.")
    layer: int = Field(description="Source layer index, 0-based.")
    role: Literal["original", "injected"]
    slice: Optional[int] = Field(
        default=None, description="Index of the recipe slice this layer (or the layer it copies) came from."
    )
    next_source: Optional[str] = Field(
        default=None,
        description=(
            "Injected layers: source model of the stack layer after the injection point (None at the end of the stack)."
        ),
    )
    next_layer: Optional[int] = Field(
        default=None, description="Injected layers: source layer index after the injection point."
    )


class TensorOp(Frozen):
    """How one output tensor is made."""

    name: str = Field(description="Output tensor name.")
    source: str = Field(description="Key of the source model in Plan.sources.")
    source_name: str = Field(description="Source tensor name (read unless op is zero or random).")
    op: Literal["copy", "zero", "fill", "scale", "noise", "random", "interpolate", "lesa", "hidden"]
    value: Optional[float] = Field(
        default=None, description="scale factor, standard deviation, fill value, or interpolation weight."
    )
    second_source: Optional[str] = Field(
        default=None, description="interpolate, lesa: source model of the next layer's tensor."
    )
    second_name: Optional[str] = Field(default=None, description="interpolate, lesa: the next layer's tensor.")
    seed: Optional[int] = Field(default=None, description="Seed of this tensor's random stream (noise, random).")
    shape: tuple[int, ...]
    dtype: str = Field(description="Output safetensors dtype code (F32, BF16...).")
    source_dtype: str
    layer: Optional[int] = Field(default=None, description="Output layer index; None outside the decoder layers.")
    projection: Optional[str] = None
    expert: Optional[int] = Field(
        default=None, description="Upcycled layers: the expert this tensor belongs to (0-based); None elsewhere."
    )

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


class ModPlan(Frozen):
    """objective: mod resolved: which output layers are exits, and the size of the new head."""

    layers: list[int] = Field(description="Output layers whose hidden states are exits, the last layer included.")
    hidden_size: int
    head_parameters: int = Field(
        description="Exit norms (layers x hidden) + router (hidden x layers + layers) + the gate (1)."
    )
    distill_weight: float
    init: str
    learning_rate: float


class DistributedPlan(Frozen):
    """How a stage is parallelised over several processes, resolved from its ``distributed`` setting."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Optional[Literal[2, 3]] = Field(default=None, description="DeepSpeed's ZeRO stage (deepspeed only).")
    offload: bool = Field(default=False, description="Sharded state (fsdp) or optimizer state (deepspeed) on the CPU.")


class StagePlan(Frozen):
    """A training stage resolved against the output model."""

    name: str
    trainable_layers: list[int] = Field(description="Output layer indices that train.")
    trainable_groups: list[str] = Field(
        description=(
            "Groups beyond whole layers that train fully: embeddings, head, and in an MoE model router, experts."
        )
    )
    parameters: list[str] = Field(
        description="Names of the output tensors that train (for LoRA: the weights that get adapters)."
    )
    lora: Optional[LoraPlan] = None
    mod: Optional[ModPlan] = Field(
        default=None, description="objective: mod: the ensemble head that trains beside the parameters."
    )
    trainable_parameters: int = Field(
        description=(
            "Elements that train: of the parameters above, or for LoRA of its adapters (r*(in+out) per adapted "
            "weight), plus the MoD head."
        )
    )
    distributed: DistributedPlan = Field(
        default_factory=DistributedPlan, description="How the stage is parallelised over several processes."
    )
    settings: Stage = Field(
        description="The recipe's typed stage: datasets, learning rate, precision, LoRA settings..."
    )


class UpcyclePlan(Frozen):
    """Sparse upcycling: which output layers became MoE layers, and where each expert comes from."""

    output_architecture: str = Field(description="The MoE architecture definition written (mixtral, qwen3_moe).")
    experts: int
    top_k: int
    layers: list[int] = Field(description="Output layers whose dense MLP became experts and a router.")
    dense_layers: list[int] = Field(description="Output layers that keep their dense MLP.")
    router: str = Field(description="Router init: zero, random(std) or hidden.")
    prompts: list[dict[str, list[str]]] = Field(
        default_factory=list, description="The hidden router init's prompts per expert: {positive, negative}."
    )
    expert_init: list[str] = Field(description="Init policy of each expert.")
    expert_sources: list[Optional[str]] = Field(
        description="Source key each expert's MLP comes from; None: the layer's own source."
    )
    parameters_total: int
    parameters_active: int = Field(
        description=(
            "Parameters used per token: the total less the experts a token is not routed to (embeddings included)."
        )
    )
    renormalised: bool = Field(
        description=(
            "The top-k routing weights are renormalised to sum 1 (Mixtral always; Qwen3-MoE with norm_topk_prob)."
        )
    )
    breaks_preservation: list[str] = Field(
        description="Why the MoE layers differ from the dense MLPs (empty: they compute the same)."
    )
    aux_loss: dict[str, Any] = Field(description="Router auxiliary-loss settings of the output config.")
    order: str = Field(description="How upcycling combines with slices and inject.")


class SourcePin(Frozen):
    """What the recipe pins a source to, with the recipe locations to report a mismatch at."""

    revision: Optional[str] = Field(default=None, description="The commit the recipe pins (None: not pinned).")
    checksums: dict[str, str] = Field(default_factory=dict, description="Expected sha256 by file name.")
    locations: dict[str, str] = Field(
        default_factory=dict,
        description="'revision' and 'checksums.<file name>' -> the recipe location prefix 'file:line:col: field.path'.",
    )


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
    layer_prefix: str = Field(
        default="model.layers.{layer}.",
        description="Tensor-name template of a decoder layer in the source and output checkpoints.",
    )
    base_model: str
    sources: dict[str, SourceModel]
    dtype: str = Field(description="Output dtype name.")
    layers: list[LayerEntry]
    requires_grad_layers: list[int] = Field(
        description="Output indices of the injected layers (the TLI paper's Algorithm 1)."
    )
    init: dict[str, str] = Field(
        description="Init policy of each projection of the injected layers; others are copied."
    )
    init_recommended: dict[str, str] = Field(
        default_factory=dict,
        description="The architecture's recommended function-preserving init (used when the recipe gives none).",
    )
    identity_options: dict[str, list[str]] = Field(
        default_factory=dict, description="Per residual branch, the inits that make an injected layer add zero to it."
    )
    function_preserving: bool = Field(description="True when the output computes exactly the base model's function.")
    tensors: list[TensorOp]
    config: dict[str, Any] = Field(description="The output config.json.")
    config_changes: list[ConfigChange]
    blocking: list[str] = Field(
        default_factory=list,
        description=(
            "Choices the recipe must state before `run` (config fields that cannot follow the layer map by themselves)."
        ),
    )
    stages: list[StagePlan]
    warnings: list[str]
    totals: Totals
    output: str
    shard_size: int
    seed: int = Field(description="The recipe seed (noise and random policies, training).")
    lesa: Optional[Lesa] = Field(
        default=None, description="Settings of the lesa policy; None when no tensor is made by lesa."
    )
    upcycle: Optional[UpcyclePlan] = Field(
        default=None, description="Sparse upcycling to MoE; None: the output is not upcycled."
    )
    recipe_dtype: Optional[str] = Field(
        default=None, description="The dtype the recipe asked for; None: each tensor keeps its dtype."
    )
    pins: dict[str, SourcePin] = Field(
        default_factory=dict, description="Each source's pin from the recipe, by source key."
    )
    layers_pattern: str = Field(
        description="The peft layers_pattern of the decoder layer list (e.g. 'layers'), from the architecture."
    )
    num_layers_key: str = Field(
        description="The config.json key holding the decoder layer count, from the architecture."
    )
    vocab_key: str = Field(description="The config.json key holding the vocabulary size, from the architecture.")
    vocab_size: Optional[int] = Field(
        default=None,
        description=(
            "The vocabulary size (the decoder config's vocab_key, or the architecture's default for it); None when "
            "unknown."
        ),
    )
    decoder_config_path: list[str] = Field(
        default_factory=list,
        description="Where the decoder's config sits in config (['text_config'] for a VLM; [] when at the top).",
    )
    source_files: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "sha256 of every file each source contributes, by source key and file name; filled in by `run` "
            "(empty in `plan`)."
        ),
    )

    def injected(self) -> list[LayerEntry]:
        return [entry for entry in self.layers if entry.role == "injected"]

    def layer_key(self, layer: int, suffix: str) -> str:
        """``(12, "mlp.down_proj.weight")`` -> ``model.layers.12.mlp.down_proj.weight`` under this plan's prefix."""
        return self.layer_prefix.format(layer=layer) + suffix

    def split_layer_key(self, name: str) -> Optional[tuple[int, str]]:
        """The inverse of ``layer_key``; None for a tensor outside the decoder layers.
        The index is one whole path segment: ``layers.1.`` never matches ``layers.10.``."""
        head, _, tail = self.layer_prefix.partition("{layer}")
        if not name.startswith(head):
            return None
        index, sep, rest = name[len(head) :].partition(tail) if tail else (name[len(head) :], "", "")
        if not sep or not rest or not index.isdigit() or (len(index) > 1 and index[0] == "0"):
            return None
        return int(index), rest


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor's stream, independent of the order tensors are made in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
