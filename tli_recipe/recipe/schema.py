"""The recipe: pydantic models of the YAML a user writes. No I/O, no torch.

Key names are the public contract (see docs/recipes.md). Indices are 0-based and ranges
half-open ``[start, end)``, as in Python slices. Checks that need the checkpoint
(layer counts, which projections exist) run later, in ``plan.compile_plan``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tli_recipe.errors import did_you_mean
from tli_recipe.recipe.base import NoNulls, Strict, fail, file_schema
from tli_recipe.recipe.policy import (  # noqa: F401 - exported here too
    POLICY_FORMS,
    POLICY_SCHEMA,
    SIMPLE_POLICIES,
    VALUE_POLICIES,
    Policy,
    PolicyField,
    dump_policy,
    parse_policy,
)
from tli_recipe.recipe.sizes import ShardSize, parse_size  # noqa: F401 - parse_size exported here too
from tli_recipe.recipe.sources import ModelField, ModelRef, SourceRef  # noqa: F401 - ModelRef, SourceRef exported here too

Dtype = Literal["float32", "float16", "bfloat16"]

#: Every per-layer tensor group a recipe may name in ``inject.init``. Which of
#: them a checkpoint really has is the architecture's business (checked at plan time).
PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "q_norm",
    "k_norm",
    "router",
)


def projection_order(name: str) -> tuple[int, str]:
    """The one order projections are shown in (q, k, v, o, ..., norms, router), whatever order a recipe
    wrote them in; a name outside PROJECTIONS (an expert's tensor) goes last, alphabetically."""
    return (PROJECTIONS.index(name) if name in PROJECTIONS else len(PROJECTIONS), name)


#: The linear projections LoRA can target (norms cannot).
LINEAR_PROJECTIONS: tuple[str, ...] = tuple(p for p in PROJECTIONS if p.endswith("_proj") or p == "router")

LAYER_GROUPS: tuple[str, ...] = ("injected", "original", "all", "embeddings", "head", "router", "experts", "shared")
#: The groups that name output layers (``upcycle.layers`` takes these and ``{layers: [start, end]}``).
LAYER_SELECTORS: tuple[str, ...] = ("all", "injected", "original")
#: Groups of an MoE layer's tensors: its routers, its experts, its shared experts (where the architecture has them).
MOE_GROUPS: tuple[str, ...] = ("router", "experts", "shared")

# Bounds that keep a tiny file from making ``plan`` allocate without limit. No released model has
# more than a few hundred layers; the plan bounds the output further by the checkpoint it reads.
MAX_LAYERS = 1024  # layer indices, stack positions, every, slices and injection sites
MAX_COPIES = 64  # layers injected at one position (LLaMA Pro uses 1 to 8)
MAX_STAGES = 64
MAX_DATASETS = 256
MAX_SELECTORS = 32  # entries of a stage's trainable list
MAX_CONFIG_KEYS = 256  # keys of output_config
MAX_EXPERTS = 256  # experts of an upcycled layer (released MoE models have at most a few hundred)

# >= 0 is checked with the order (or the range), in one message; the JSON schema states it too.
Position = Annotated[StrictInt, Field(lt=MAX_LAYERS, json_schema_extra={"minimum": 0})]
#: [start, end): half-open, 0-based; validated by _check_range, whose messages the schema bounds mirror.
LayerRange = tuple[
    Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_LAYERS - 1})],
    Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_LAYERS})],
]


# --- init policies (recipe/policy.py) ---------------------------------------------


def _init_fields() -> dict:
    return {
        name: (
            Optional[PolicyField],
            Field(default=None, description=f"Init policy of every tensor of `{name}` (weight and bias)."),
        )
        for name in PROJECTIONS
    }


class _InitBase(Strict):
    key_noun: ClassVar[str] = "projection"

    def policies(self) -> dict[str, Policy]:
        """The projections this recipe names, with their policies (unnamed ones are copied)."""
        return {name: getattr(self, name) for name in PROJECTIONS if getattr(self, name) is not None}


# One optional field per projection: the field list is data, so it is built, not typed out.
Init = create_model(  # type: ignore[call-overload]
    "Init",
    __base__=_InitBase,
    __doc__="Per-projection init policy of the injected layers; a projection not named is copied.",
    **_init_fields(),
)


# --- layout ------------------------------------------------------------------------


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    start, end = value
    if start < 0:
        raise fail(f"start must be >= 0, got {start}; layer indices are 0-based")
    if end <= start:
        raise fail(f"[{start}, {end}] is empty; expected [start, end) with start < end (half-open, 0-based)")
    if end > MAX_LAYERS:
        raise fail(f"end {end} is past any checkpoint's layers; expected layer indices of at most {MAX_LAYERS}")
    return value


class Slice(NoNulls):
    """A run of consecutive source layers copied into the output stack."""

    model: Optional[ModelField] = Field(
        default=None,
        description=(
            "Model the layers come from (local directory, hub id, or {path, revision, checksums} as base_model); "
            "default: base_model."
        ),
    )
    layer_range: LayerRange = Field(description="Source layers [start, end): half-open, 0-based.")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        return _check_range(value)


class Lesa(Strict):
    """Settings of the `lesa` policy (LESA, arXiv 2502.13794); defaults follow the paper's public setup."""

    hidden: StrictInt = Field(default=256, ge=1, description="Width of the predictor's two hidden layers.")
    epochs: StrictInt = Field(default=10, ge=1, description="Training epochs of each projection type's predictor.")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate.")
    norm_weight: float = Field(
        default=5e-4,
        ge=0,
        lt=1,
        description="lambda: weight of the row-norm term in the loss (1 - lambda) * MSE + lambda * MSE(norms).",
    )
    batch_size: StrictInt = Field(default=64, ge=1, description="Rows (singular directions) per batch.")
    seed: StrictInt = Field(default=0, ge=0, description="Seed of the predictor's initialisation and batch order.")


class Inject(NoNulls):
    """Layer injection: new layers after chosen positions of the stack, each initialised from its neighbours.

    Exactly one of `every`, `after` and `between` says where.
    """

    every: Optional[StrictInt] = Field(
        default=None,
        ge=1,
        le=MAX_LAYERS,
        description=(
            "K: insert after every K layers of the sliced stack (Algorithm 1: after stack position i "
            "when (i + 1) % K == 0)."
        ),
    )
    after: Optional[list[Position]] = Field(
        default=None,
        min_length=1,
        max_length=MAX_LAYERS,
        description="Insert after these stack positions (0-based, ascending, each once).",
    )
    between: Optional[LayerRange] = Field(
        default=None,
        description=(
            "Insert one layer between each pair of neighbouring stack positions in [start, end) (half-open, 0-based): "
            "end - start - 1 new layers, as LESA does over the upper half."
        ),
    )
    copies: StrictInt = Field(
        default=1, ge=1, le=MAX_COPIES, description="Number of layers inserted at each position (LLaMA Pro's P)."
    )
    source: Literal["previous"] = Field(
        default="previous",
        description=(
            "Which layer each injected layer copies: `previous`, the layer just before it (`interpolate` and `lesa` "
            "also read the layer after it)."
        ),
    )
    init: Optional[Init] = Field(  # type: ignore[valid-type]
        default=None,
        description=(
            "Per-projection init policy; tensors not named are copied. Default: the architecture's "
            "function-preserving init (o_proj and down_proj zero for Llama-family models). A given `init` replaces "
            "the default entirely."
        ),
    )
    lesa: Lesa = Field(default_factory=Lesa, description="Settings of the lesa policy.")

    @field_validator("after")
    @classmethod
    def _after(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (any(v < 0 for v in value) or value != sorted(set(value))):
            raise fail(f"{value} must be ascending stack positions >= 0, each once; expected for example [15, 16, 17]")
        return value

    @field_validator("between")
    @classmethod
    def _between(cls, value: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        if value is not None:
            start, end = _check_range(value)
            if end - start < 2:
                raise fail(f"[{start}, {end}] holds no pair of neighbouring positions; expected end - start >= 2")
        return value

    def positions(self, stack: int) -> list[int]:
        """Stack positions an injection follows, for a stack of ``stack`` layers."""
        if self.every is not None:
            return [i for i in range(stack) if (i + 1) % self.every == 0]
        if self.after is not None:
            return list(self.after)
        start, end = self.between
        return list(range(start, end - 1))


# --- training stages ---------------------------------------------------------------


class LayerSpan(Strict):
    """An explicit range of output layers: ``{layers: [start, end]}``, half-open, 0-based."""

    layers: LayerRange = Field(description="Output layers [start, end): half-open, 0-based.")

    @field_validator("layers")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        return _check_range(value)


def _parse_selector(value: Any) -> Any:
    if isinstance(value, str):
        if value not in LAYER_GROUPS:
            raise fail(
                f"'{value}' is not a layer group{did_you_mean(value, LAYER_GROUPS)}; expected one of: "
                f"{', '.join(LAYER_GROUPS)}, or {{layers: [start, end]}}"
            )
        return value
    if isinstance(value, LayerSpan):
        return value
    if isinstance(value, dict) and set(value) == {"layers"}:
        span = value["layers"]
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise fail(
                f"layers: {span!r} is not a range; expected {{layers: [start, end]}} with integer output layer "
                "indices (half-open, 0-based)"
            )
        return LayerSpan(layers=(span[0], _check_range(tuple(span))[1]))
    raise fail(
        f"{value!r} is not a layer group; expected one of: {', '.join(LAYER_GROUPS)}, or {{layers: [start, end]}}"
    )


Selector = Annotated[
    Union[Literal["injected", "original", "all", "embeddings", "head", "router", "experts", "shared"], LayerSpan],
    BeforeValidator(_parse_selector),
]


class Lora(Strict):
    """LoRA adapters on the stage's trainable layers."""

    r: StrictInt = Field(ge=1, description="LoRA rank.")
    alpha: float = Field(gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    targets: list[Literal[LINEAR_PROJECTIONS]] = Field(  # type: ignore[valid-type]
        min_length=1,
        max_length=len(LINEAR_PROJECTIONS),
        description=(
            "Projections that get adapters. Leaving out o_proj/down_proj on zero-initialised injected layers means "
            "they never move."
        ),
    )
    quantize: Optional[Literal[4, 8]] = Field(
        default=None,
        description=(
            "QLoRA: hold the frozen weights in 4 or 8 bits while training (bitsandbytes, CUDA only); the adapters are "
            "merged into the unquantized weights at the end of the stage."
        ),
    )
    allow_frozen_injected: StrictBool = Field(
        default=False,
        description=(
            "Accept targets that leave out projections zero-initialised in the injected layers (o_proj, down_proj): "
            "those layers then stay the identity through this stage. Without it `train` and `emit` refuse such a "
            "stage."
        ),
    )


class Dataset(Strict):
    """Training text for a stage."""

    path: str = Field(
        min_length=1,
        description=(
            "A plain-text file (one document per non-empty line, as the `datasets` text loader reads it) or a "
            ".jsonl/.json file (one JSON object per line); relative to the recipe file's folder (`~` is the home "
            "directory)."
        ),
    )
    text_field: str = Field(default="text", min_length=1, description="The JSONL field holding each document's text.")


STRATEGIES = ("ddp", "fsdp", "deepspeed")


def _parse_distributed(value: Any) -> Any:
    if isinstance(value, str):  # `distributed: fsdp` is `distributed: {strategy: fsdp}`
        if value not in STRATEGIES:
            raise fail(
                f"'{value}' is not a strategy{did_you_mean(value, STRATEGIES)}; "
                f"expected one of: {', '.join(STRATEGIES)}"
            )
        return {"strategy": value}
    return value


class Distributed(Strict):
    """How a stage is spread over several processes (GPUs, machines) when it runs under a launcher
    (`accelerate launch`, `torchrun`); one process trains the same way whatever this says."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        default="ddp",
        description=(
            "ddp: every process holds the whole model and the gradients are averaged; fsdp: FSDP2 shards "
            "parameters, gradients and optimizer state over the processes (each parameter on its own, so a stage "
            "may train part of a layer); deepspeed: DeepSpeed ZeRO (zero_stage)."
        ),
    )
    zero_stage: Optional[Literal[2, 3]] = Field(
        default=None,
        description=(
            "deepspeed only: 2 shards gradients and optimizer state, 3 also the parameters (default 3). Frozen "
            "parameters get no optimizer state in either."
        ),
    )
    offload: StrictBool = Field(
        default=False,
        description=(
            "fsdp: parameters, gradients and optimizer state on the CPU; deepspeed: optimizer state (and with "
            "zero_stage 3 the parameters) on the CPU. Less GPU memory, slower steps."
        ),
    )

    @model_validator(mode="after")
    def _for_the_strategy(self) -> "Distributed":
        if self.zero_stage is not None and self.strategy != "deepspeed":
            raise fail(
                f"zero_stage is a DeepSpeed setting and the strategy is {self.strategy}; expected strategy: deepspeed, "
                "or no zero_stage"
            )
        if self.offload and self.strategy == "ddp":
            raise fail("offload needs a sharded strategy; expected strategy: fsdp or deepspeed, or offload: false")
        return self


class Mod(Strict):
    """Mixture-of-Depths ensemble tuning (arXiv 2410.13077): the last `layers` decoder layers each predict
    through a new norm (a copy of the final norm) and the shared head; a router mixes their logits."""

    layers: StrictInt = Field(
        default=3,
        ge=2,
        description=(
            "Late decoder layers in the ensemble, the last one included (the paper: 3); at most the output's layer "
            "count."
        ),
    )
    distill_weight: float = Field(
        default=0.1,
        ge=0,
        description=(
            "lambda: weight of the KL divergence from the final layer's distribution (not trained through) to each "
            "earlier exit, averaged over the exits."
        ),
    )
    init: Literal["exact", "uniform"] = Field(
        default="exact",
        description=(
            "exact: the gate between the model's own logits and the ensemble starts at 0, so step 0 computes exactly "
            "the model's logits; uniform: the paper's ensemble from step 0 (zero router: equal weights)."
        ),
    )
    learning_rate: float = Field(
        default=1e-3,
        gt=0,
        description=(
            "Learning rate of the MoD head (exit norms, router, gate); the stage's learning_rate applies to the "
            "model's parameters."
        ),
    )


class Stage(Strict):
    """One training stage: which parameters train, and how."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Stage name: letters, digits, '.', '_' and '-'.",
    )
    trainable: list[Selector] = Field(
        min_length=1,
        max_length=MAX_SELECTORS,
        description=(
            "Layer groups that train: injected, original, all, embeddings, head, or {layers: [start, end]} of output "
            "layers; in an MoE output also router, experts (and shared where the architecture has shared experts)."
        ),
    )
    lora: Optional[Lora] = Field(
        default=None, description="Train LoRA adapters on the trainable layers instead of their full weights."
    )
    datasets: list[Dataset] = Field(
        default_factory=list,
        max_length=MAX_DATASETS,
        description="Training text of this stage; `tli-recipe train --data` and `emit --data` replace it.",
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak learning rate of AdamW, reached after warmup.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup: cosine or linear decay to 0, or constant."
    )
    warmup_steps: StrictInt = Field(
        default=0, ge=0, description="Optimizer steps of linear warmup from 0 to learning_rate."
    )
    max_steps: Optional[StrictInt] = Field(
        default=None, ge=1, description="Optimizer steps to train; give max_steps or epochs, not both."
    )
    epochs: Optional[float] = Field(
        default=None, gt=0, description="Passes over the training data; default 1 when max_steps is absent."
    )
    batch_size: StrictInt = Field(
        default=1, ge=1, description="Packed sequences per device in one forward pass (the micro batch)."
    )
    gradient_accumulation: StrictInt = Field(
        default=1,
        ge=1,
        description=(
            "Micro batches per optimizer step; sequences per step = batch_size x gradient_accumulation x devices."
        ),
    )
    sequence_length: StrictInt = Field(
        default=2048,
        ge=2,
        description="Tokens per packed training sequence (documents are joined with the EOS token, then cut).",
    )
    precision: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description=(
            "Mixed-precision compute dtype (autocast); float32 turns it off. auto: bfloat16 on a GPU with bfloat16, "
            "float32 on a CPU (where bfloat16 is many times slower), chosen when training starts. Weights keep the "
            "checkpoint's dtype."
        ),
    )
    gradient_checkpointing: StrictBool = Field(
        default=False,
        description="Recompute activations in the backward pass (non-reentrant): less memory, about a third slower.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0, description="AdamW weight decay; applies only to the parameters that train."
    )
    validation_fraction: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Share of the packed sequences held out for the validation loss, in [0, 1); 0: no validation.",
    )
    eval_steps: StrictInt = Field(default=100, ge=1, description="Optimizer steps between validation losses.")
    save_steps: StrictInt = Field(
        default=500,
        ge=1,
        description="Optimizer steps between resumable checkpoints (an interrupted stage resumes from the last one).",
    )
    objective: Literal["lm", "mod"] = Field(
        default="lm",
        description=(
            "lm: next-token cross-entropy of the model's logits; mod: Mixture-of-Depths ensemble tuning (the built-in "
            "trainer only)."
        ),
    )
    mod: Optional[Mod] = Field(default=None, description="Settings of objective: mod (default: the paper's k = 3).")
    distributed: Annotated[Distributed, BeforeValidator(_parse_distributed)] = Field(
        default_factory=Distributed,
        description=(
            "How the stage is parallelised over several processes: ddp (default), fsdp or deepspeed, as a name or "
            "{strategy, zero_stage, offload}; every trainer's config carries it."
        ),
    )


# --- sparse upcycling ----------------------------------------------------------------

ROUTER_FORMS = "zero, {random: std}, hidden"
EXPERT_POLICIES = ("copy", "noise", "scale")


def _parse_router(value: Any) -> Any:
    if value == "hidden":
        return {"kind": "hidden"}
    if value == "zero" or (isinstance(value, dict) and list(value) == ["random"]):
        return parse_policy(value)
    if isinstance(value, Policy):
        return value
    raise fail(f"{value!r} is not a router init; expected one of: {ROUTER_FORMS}")


def _expert_policy(value: Any, where: str = "") -> Policy:
    try:
        policy = value if isinstance(value, Policy) else Policy(**parse_policy(value))
    except PydanticCustomError as exc:
        raise fail(where + exc.message()) from None
    if policy.kind not in EXPERT_POLICIES:
        raise fail(
            f"{where}'{policy.kind}' is not an expert init; expected one of: copy, {{noise: std}}, {{scale: x}} "
            "(applied to every weight of the expert)"
        )
    return policy


def _parse_expert_init(value: Any) -> Any:
    if isinstance(value, list):
        return [_expert_policy(v, f"entry {i} (expert {i}): ") for i, v in enumerate(value)]
    return _expert_policy(value)


def _dump_expert_init(value: Any) -> Any:
    return [dump_policy(p) for p in value] if isinstance(value, list) else dump_policy(value)


_EXPERT_POLICY_SCHEMA = {"oneOf": [{"enum": ["copy"]}, *POLICY_SCHEMA["oneOf"][1:3]]}
ExpertInit = Annotated[
    Union[Policy, list[Policy]],
    BeforeValidator(_parse_expert_init),
    PlainSerializer(_dump_expert_init),
    WithJsonSchema(
        {
            "oneOf": [
                _EXPERT_POLICY_SCHEMA,
                {"type": "array", "items": _EXPERT_POLICY_SCHEMA, "minItems": 1, "maxItems": MAX_EXPERTS},
            ]
        }
    ),
]


class ExpertPrompts(Strict):
    """Text that shows what one expert is for: the ``hidden`` router init points its row at these prompts."""

    positive: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=256, description="Prompts this expert should take."
    )
    negative: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=256, description="Prompts it should not take (their mean is subtracted)."
    )


class ExpertSource(Strict):
    """Where one expert's MLP comes from: another checkpoint of the same architecture and widths."""

    model: ModelField = Field(description="A local directory, hub id, or {path, revision, checksums} as base_model.")


def _parse_layers(value: Any) -> Any:
    if isinstance(value, str) and value not in LAYER_SELECTORS:
        raise fail(
            f"'{value}' is not a layer group{did_you_mean(value, LAYER_SELECTORS)}; expected one of: "
            f"{', '.join(LAYER_SELECTORS)}, or {{layers: [start, end]}}"
        )
    return _parse_selector(value)


class Upcycle(NoNulls):
    """Sparse upcycling (arXiv 2212.05055): the dense MLP of chosen output layers becomes E experts and a router."""

    experts: StrictInt = Field(ge=1, le=MAX_EXPERTS, description="E: experts per upcycled layer.")
    top_k: StrictInt = Field(
        ge=1, le=MAX_EXPERTS, description="k: experts each token is routed to (num_experts_per_tok); k <= E."
    )
    layers: Optional[
        list[Annotated[Union[Literal["all", "injected", "original"], LayerSpan], BeforeValidator(_parse_layers)]]
    ] = Field(
        default=None,
        min_length=1,
        max_length=MAX_SELECTORS,
        description=(
            "Output layers to upcycle (after slices and inject): all, injected, original, or {layers: [start, end]}; "
            "default: all."
        ),
    )
    output: Optional[str] = Field(
        default=None,
        min_length=1,
        description=(
            "The MoE architecture written (mixtral, qwen3_moe); default: the source architecture's MoE sibling "
            "(llama, mistral -> mixtral; qwen3 -> qwen3_moe)."
        ),
    )
    router: Annotated[
        Policy,
        BeforeValidator(_parse_router),
        PlainSerializer(dump_policy),
        WithJsonSchema({"oneOf": [{"enum": ["zero", "hidden"]}, POLICY_SCHEMA["oneOf"][3]]}),
    ] = Field(
        default_factory=lambda: Policy(kind="zero"),
        description=(
            "Router init: zero (uniform routing), {random: std} (seeded), or hidden: each expert's row is the "
            "normalised mean MLP input (the router's own input) at the last token of its prompts, minus that of its "
            "negative prompts (runs the source model; needs prompts)."
        ),
    )
    prompts: Optional[list[ExpertPrompts]] = Field(
        default=None,
        min_length=1,
        max_length=MAX_EXPERTS,
        description="The hidden router init's prompts, one entry per expert: {positive: [...], negative: [...]}.",
    )
    init: ExpertInit = Field(
        default_factory=lambda: Policy(kind="copy"),
        description=(
            "Expert init: one policy for every expert, or a list of E (expert i gets entry i): copy, {noise: std}, "
            "{scale: x}, applied to every weight of the expert."
        ),
    )
    sources: Optional[list[ExpertSource]] = Field(
        default=None,
        min_length=1,
        max_length=MAX_EXPERTS,
        description=(
            "Expert i's MLP from sources[i] (E entries; checkpoints of the same architecture and widths); default: "
            "every expert from the layer's own source."
        ),
    )

    def expert_policies(self) -> list[Policy]:
        return list(self.init) if isinstance(self.init, list) else [self.init] * self.experts


MAX_WIDTH = 1 << 20  # a target size beyond any released model's width


class Widen(NoNulls):
    """Function-preserving width growth: target sizes in the config's own terms (any subset).

    Applied to the output layers after slices and inject. Every size must be at least the
    source's; plan refuses sizes no exact construction reaches, with the nearest that work."""

    hidden_size: Optional[StrictInt] = Field(
        default=None,
        ge=1,
        le=MAX_WIDTH,
        description=(
            "Residual width; an integer multiple n of the source's (HyperCloning: the residual stream becomes n "
            "copies). Heads, KV heads and intermediate_size default to n times theirs."
        ),
    )
    intermediate_size: Optional[StrictInt] = Field(
        default=None, ge=1, le=MAX_WIDTH, description="MLP width: any size at least the source's (new neurons)."
    )
    num_attention_heads: Optional[StrictInt] = Field(
        default=None,
        ge=1,
        le=MAX_WIDTH,
        description="Query heads at the same head_dim; heads / num_key_value_heads stays the source's ratio.",
    )
    num_key_value_heads: Optional[StrictInt] = Field(
        default=None,
        ge=1,
        le=MAX_WIDTH,
        description="Key/value heads at the same head_dim; default: num_attention_heads over the source's ratio.",
    )
    init: Literal["split", "zero"] = Field(
        default="split",
        description=(
            "New neurons and heads: split (Net2Net: copies of seeded-chosen ones, the output weight divided among "
            "the copies with seeded uneven shares) or zero (copies whose output weights are 0)."
        ),
    )
    noise: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Std of seeded noise added to one copy's output-side weights and subtracted from another's (the sum, "
            "so the function, is unchanged); 0: none."
        ),
    )

    seed: Optional[StrictInt] = Field(
        default=None,
        ge=0,
        description="Seed of the copies chosen, the split shares and the noise; default: the recipe's seed.",
    )

    @model_validator(mode="after")
    def _some_size(self) -> "Widen":
        if all(
            v is None
            for v in (self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_key_value_heads)
        ):
            raise fail(
                "no target size; expected at least one of hidden_size, intermediate_size, num_attention_heads, "
                "num_key_value_heads"
            )
        return self


# --- the recipe --------------------------------------------------------------------


class Recipe(NoNulls):
    """A growth recipe: which layers the output has, how new layers start, how they train."""

    name: Optional[str] = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the output model; default: the recipe file's stem.",
    )
    base_model: ModelField = Field(
        description=(
            "The source checkpoint: a local directory, or a hub id resolved through the local Hugging Face cache "
            "(id or id@revision), or {path, revision, checksums} to pin it."
        )
    )
    dtype: Optional[Dtype] = Field(default=None, description="dtype of the output tensors; default: the source dtype.")
    slices: Optional[list[Slice]] = Field(
        default=None,
        min_length=1,
        max_length=MAX_LAYERS,
        description=(
            "The output stack before injection, as source layer ranges; default: every layer of base_model once. Two "
            "overlapping slices are SOLAR-style depth up-scaling."
        ),
    )
    inject: Optional[Inject] = Field(
        default=None, description="Layer injection (TLI / LLaMA Pro); absent: no layer is injected."
    )
    widen: Optional[Widen] = Field(
        default=None,
        description=(
            "Function-preserving width growth (MLP width, heads, hidden size), applied after slices and inject; "
            "absent: widths stay the source's."
        ),
    )
    upcycle: Optional[Upcycle] = Field(
        default=None,
        description=(
            "Sparse upcycling to Mixture-of-Experts, applied to the output layers after slices and inject; absent: "
            "the output stays dense."
        ),
    )
    stages: list[Stage] = Field(
        default_factory=list,
        max_length=MAX_STAGES,
        description="Training stages, resolved in the plan to trainable layers and parameter names.",
    )
    output: Optional[str] = Field(
        default=None,
        min_length=1,
        description=(
            "Output directory, relative to the recipe file's folder (a --set value: to the working directory); "
            "default: out/<name> in the working directory."
        ),
    )
    shard_size: ShardSize = Field(default=5 * 10**9, description="Largest output shard in bytes (or 5GB, 500MiB...).")
    seed: StrictInt = Field(
        default=0,
        ge=0,
        description=(
            "Seed of the noise and random policies; each tensor draws from its own stream derived from this seed and "
            "its name."
        ),
    )
    output_config: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_CONFIG_KEYS,
        description=(
            "Fields of the output config.json set explicitly (null removes a field); applied last. Needed where a "
            "config field cannot follow the layer map by itself (plan says which)."
        ),
    )


def recipe_schema() -> dict:
    """The JSON schema of a recipe file (``schemas/recipe.schema.json``)."""
    return file_schema(Recipe, "tli-recipe recipe")
