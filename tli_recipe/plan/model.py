"""The Plan and its parts: pure data saying what every output tensor is made of.

``tli-recipe plan --json`` prints a Plan; `run` writes it as ``plan.json`` beside the
checkpoint, and everything after (verify, emit, train) reads only that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

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


class WidenAxis(Frozen):
    """One axis of a widened tensor: output index i along ``axis`` reads source index ``index[i]``
    of the dimension map ``dim`` (expanded by its unit); ``reads``: the tensor reads that dimension
    (an input side), so the map's per-unit ``scale`` and its noise pairs apply."""

    axis: int = Field(ge=0)
    dim: Literal["residual", "intermediate", "heads", "kv_heads"]
    reads: bool


class DimMap(Frozen):
    """How one width grows: output unit i is a copy of source unit ``index[i]`` (a unit is ``unit``
    consecutive elements: head_dim for heads, 1 otherwise)."""

    before: int = Field(description="Source units.")
    after: int = Field(description="Output units.")
    unit: int = Field(ge=1, description="Elements per unit.")
    index: list[int] = Field(description="Source unit of each output unit; the first `before` are the identity.")
    scale: list[float] = Field(
        description="Factor on each output unit where a tensor reads it (the copies of a unit sum to 1; 0: zero init)."
    )
    noise: float = Field(default=0.0, description="Std of the exact noise on reading sides; 0: none.")
    noise_pairs: list[tuple[int, int]] = Field(
        default_factory=list, description="Output units (a, b) copying one source unit: +N on a, -N on b."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DimMap":
        # plan.json is an input like any other: a map that would index out of range is refused here
        if not (1 <= self.before <= self.after) or len(self.index) != self.after or len(self.scale) != self.after:
            raise ValueError(f"a dimension map of {self.before} -> {self.after} units needs that many index and scale")
        if any(not 0 <= i < self.before for i in self.index) or self.index[: self.before] != list(range(self.before)):
            raise ValueError("a dimension map's index must keep the source units first and stay within them")
        if any(not (0 <= a < self.after and 0 <= b < self.after and a != b) for a, b in self.noise_pairs):
            raise ValueError("a dimension map's noise pairs must be two different output units")
        if len({u for pair in self.noise_pairs for u in pair}) != 2 * len(self.noise_pairs):
            raise ValueError("a dimension map's noise pairs must not share a unit")
        return self


class WidenPlan(Frozen):
    """Width growth: the dimension maps every widened tensor is gathered through, and the new widths."""

    dims: dict[str, DimMap]
    config: dict[str, int] = Field(description="The new widths written into config.json (head_dim explicit).")
    before: dict[str, int] = Field(description="The source's widths.")
    init: str
    noise: float
    seed: int
    tied_fold: Optional[float] = Field(
        default=None,
        description="Tied embeddings and hidden x n: the final norm gain's factor (1/n; Gemma 1/sqrt(n)).",
    )
    embed_factor: Optional[float] = Field(
        default=None,
        description="Gemma and hidden x n: the embedding's factor (1/sqrt(n), for its sqrt(hidden) scale).",
    )
    norm_offset: float = Field(default=0.0, description="Norm gains are stored as w in offset + w (Gemma: 1).")
    order: str = Field(description="How widening combines with slices and inject.")


class TensorOp(Frozen):
    """How one output tensor is made."""

    name: str = Field(description="Output tensor name.")
    source: str = Field(description="Key of the source model in Plan.sources.")
    source_name: str = Field(description="Source tensor name (read unless op is zero or random).")
    op: Literal["copy", "zero", "fill", "scale", "noise", "random", "interpolate", "lesa", "hidden", "widen"]
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
    axes: Optional[list[WidenAxis]] = Field(
        default=None, description="widen: the axes gathered through Plan.widen's dimension maps, in order."
    )
    value_offset: Optional[float] = Field(
        default=None, description="widen: the factor multiplies offset + stored value (a Gemma 1 + w norm gain)."
    )
    source_shape: Optional[tuple[int, ...]] = Field(
        default=None, description="widen: the shape of the source tensor (None: the same as shape)."
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
    frozen_injected: list[int] = Field(
        description=(
            "Injected output layers these adapters can never move: their block outputs exactly 0 through "
            "zeroed projections the targets leave out (frozen_by) and no earlier full-weight stage trained. "
            "emit and train refuse the stage unless its lora.allow_frozen_injected is true."
        )
    )
    frozen_by: list[str] = Field(
        description="The zeroed projections of those layers that the targets leave out (empty when none is frozen)."
    )


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


#: A name that becomes a path segment (a stage's output folder and config files, the output model's
#: name): the recipe's own rule, applied again when a plan.json is read back (it may have been edited).
SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class DistributedPlan(Frozen):
    """How a stage is parallelised over several processes, resolved from its ``distributed`` setting."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Optional[Literal[2, 3]] = Field(default=None, description="DeepSpeed's ZeRO stage (deepspeed only).")
    offload: bool = Field(default=False, description="Sharded state (fsdp) or optimizer state (deepspeed) on the CPU.")


class LesaSettings(Frozen):
    """Settings of the lesa policy, copied from the recipe's ``inject.lesa`` (the recipe checked them)."""

    hidden: StrictInt = Field(ge=1)
    epochs: StrictInt = Field(ge=1)
    lr: float = Field(gt=0)
    norm_weight: float = Field(ge=0, lt=1)
    batch_size: StrictInt = Field(ge=1)
    seed: StrictInt = Field(ge=0)


class SettingsSpan(Frozen):
    """A ``{layers: [start, end]}`` trainable selector: output layers [start, end), half-open, 0-based."""

    layers: tuple[StrictInt, StrictInt]

    @model_validator(mode="after")
    def _range(self) -> "SettingsSpan":
        if not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError("a layer span must be [start, end] with 0 <= start < end")
        return self


class SettingsLora(Frozen):
    """A stage's LoRA settings as the recipe gave them (LoraPlan holds what they resolved to)."""

    r: StrictInt = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    targets: list[str] = Field(min_length=1)
    quantize: Optional[Literal[4, 8]] = None
    allow_frozen_injected: StrictBool = False


class SettingsDataset(Frozen):
    """Training text of a stage: a file path (absolute once compiled) and the JSONL text field."""

    path: str = Field(min_length=1)
    text_field: str = Field(default="text", min_length=1)


class SettingsMod(Frozen):
    layers: StrictInt = Field(ge=2)
    distill_weight: float = Field(ge=0)
    init: Literal["exact", "uniform"]
    learning_rate: float = Field(gt=0)


class SettingsDistributed(Frozen):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Optional[Literal[2, 3]] = None
    offload: StrictBool = False


class StageSettings(Frozen):
    """A stage's training settings, copied once from the recipe's stage when the plan is compiled: what
    emit, train and compare read (datasets, schedule, precision, LoRA...). The recipe validated them; the
    bounds here refuse an edited plan.json. Its JSON has the recipe stage's shape, so ``--set`` on a grown
    checkpoint can validate overrides through the recipe's schema and convert back (training/settings.py)."""

    name: str = Field(pattern=SEGMENT, max_length=200)
    trainable: list[
        Union[Literal["injected", "original", "all", "embeddings", "head", "router", "experts", "shared"], SettingsSpan]
    ] = Field(min_length=1)
    lora: Optional[SettingsLora] = None
    datasets: list[SettingsDataset] = Field(default_factory=list)
    learning_rate: float = Field(gt=0)
    scheduler: Literal["cosine", "linear", "constant"]
    warmup_steps: StrictInt = Field(ge=0)
    max_steps: Optional[StrictInt] = Field(default=None, ge=1)
    epochs: Optional[float] = Field(default=None, gt=0)
    batch_size: StrictInt = Field(ge=1)
    gradient_accumulation: StrictInt = Field(ge=1)
    sequence_length: StrictInt = Field(ge=2)
    precision: Literal["auto", "bfloat16", "float16", "float32"]
    gradient_checkpointing: StrictBool
    weight_decay: float = Field(ge=0)
    validation_fraction: float = Field(ge=0, lt=1)
    eval_steps: StrictInt = Field(ge=1)
    save_steps: StrictInt = Field(ge=1)
    objective: Literal["lm", "mod"]
    mod: Optional[SettingsMod] = None
    distributed: SettingsDistributed = Field(default_factory=SettingsDistributed)

    @classmethod
    def of(cls, stage: Any) -> "StageSettings":
        """The plan's copy of a recipe stage (any object that dumps to the recipe stage's JSON)."""
        return cls.model_validate(stage.model_dump(mode="json", exclude_none=True))


class StagePlan(Frozen):
    """A training stage resolved against the output model."""

    name: str = Field(pattern=SEGMENT, max_length=200, description="The stage's name: one plain path segment.")
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
    settings: StageSettings = Field(
        description="The stage's training settings from the recipe: datasets, learning rate, precision, LoRA..."
    )

    @model_validator(mode="after")
    def _one_name(self) -> "StagePlan":
        if self.settings.name != self.name:
            raise ValueError(f"the stage is named {self.name!r} but its settings {self.settings.name!r}")
        return self


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


class RecipeSpot(Frozen):
    """Where a recipe entry was written: the field path, and the file, line and column of its value
    and of its key (a missing file is reported at the key, a wrong digest at the value). A key
    or value that was not written is at its nearest written ancestor."""

    path: tuple[Union[str, int], ...] = Field(
        description="The field path, e.g. ('base_model', 'checksums', 'config.json')."
    )
    file: str = Field(description="The recipe file, or the command-line option (--set ...) that wrote the entry.")
    line: int = Field(ge=1)
    column: int = Field(ge=1)
    key_line: int = Field(ge=1)
    key_column: int = Field(ge=1)


class SourcePin(Frozen):
    """What the recipe pins a source to, with the recipe spots to report a mismatch at."""

    revision: Optional[str] = Field(default=None, description="The commit the recipe pins (None: not pinned).")
    checksums: dict[str, str] = Field(default_factory=dict, description="Expected sha256 by file name.")
    revision_at: Optional[RecipeSpot] = Field(default=None, description="Where the revision is (or would be) written.")
    checksums_at: dict[str, RecipeSpot] = Field(
        default_factory=dict, description="Where each pinned file's checksum is written, by file name."
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
    name: str = Field(
        pattern=r"^[^\x00-\x1f\x7f/\\]+$",
        max_length=255,
        description="The output model's name (the recipe's name or file stem): one line, no path separator.",
    )
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
    lesa: Optional[LesaSettings] = Field(
        default=None, description="Settings of the lesa policy; None when no tensor is made by lesa."
    )
    upcycle: Optional[UpcyclePlan] = Field(
        default=None, description="Sparse upcycling to MoE; None: the output is not upcycled."
    )
    widen: Optional[WidenPlan] = Field(default=None, description="Width growth; None: widths stay the source's.")
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

    @model_validator(mode="before")
    @classmethod
    def _drop_estimates(cls, data: Any) -> Any:
        # `plan --json` appends `estimates` (memory per stage and verify's peak): derived from the plan, not part
        # of it, so its output reads back as a Plan; any other unknown key is still refused
        if isinstance(data, dict) and "estimates" in data:
            data = {k: v for k, v in data.items() if k != "estimates"}
        return data

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
