"""What the work after `plan` will cost, from the plan's shapes and counts alone (no tensor, no torch):
LESA's fit before writing, verify's peak memory, and each training stage's memory per device.

LESA. The one non-streaming op costs: an estimate of LESA's work from the plan's shapes alone.

LESA (``init: lesa``) fits one SVD and one small predictor per projection type over all layers
of the source, before the first byte is written. For a projection ``[out, in]`` of a source with
``L`` layers it factors the ``out x (L * in)`` stack (``4 m^2 n + 8 m^3`` flops for an ``m x n``
matrix, ``m <= n``) and trains the predictor ``2 in -> h -> h -> in`` on ``k (L - 2)`` rows (``k =
min(out, L * in)`` singular directions) for ``epochs`` epochs at ``6 h (3 in + h)`` flops per row
(forward and backward). The rates below turn flops into time; ``CPU_FLOPS`` was measured by
``benchmarks/lesa_benchmark.py`` (Llama-3.2-1B shapes on the 2-core development machine), so
the estimate is for a small CPU; more cores or a GPU take a fraction of it.

verify (:func:`verify_peak`): the largest unit of weights resident at once in the compute dtype, plus the
recorded activations (see its docstring); ``execute/layerwise.py`` runs it and calls this arithmetic.

Training (:func:`stage_memory`): per device, the weights, the gradients of the trainable part and Adam's
state, as the trainers hold them (the built-in trainer: transformers' Trainer with torch's AdamW, peft for
LoRA, accelerate for FSDP, DeepSpeed's ZeRO). Activations are not counted: they grow with the batch and
sequence length (and shrink with gradient checkpointing), and come on top.

- Weights keep the checkpoint's dtype (``precision`` is the autocast dtype, not the weights'); LoRA adapters
  are float32 (peft's ``autocast_adapter_dtype``); ``lora.quantize``: the decoder layers' matrices at 4 or 8
  bits, the other weights float32 (peft's ``prepare_model_for_kbit_training``).
- Gradients: one per trainable element, in its dtype. Adam: two moments per trainable element, in its dtype
  (torch's AdamW allocates them like the parameter); no master copy, the optimizer updates the weights.
- fsdp (FSDP2 through accelerate): with a 16-bit precision accelerate upcasts the trainable weights to
  float32, so they, their gradients and moments are 4 bytes each; weights, gradients and Adam state are all
  sharded over the processes (``offload``: held in CPU memory instead).
- deepspeed (ZeRO through the Hugging Face integration): with a 16-bit precision the engine casts the
  model to it (2 bytes a weight and a gradient) and the optimizer keeps a float32 master copy and two float32
  moments of the trainable part (12 bytes); ZeRO-2 shards gradients and optimizer state, ZeRO-3 the weights
  too (``offload``: optimizer state, and for ZeRO-3 the weights, in CPU memory).
- ddp: every process holds everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan, StagePlan

#: float32 flops per second of LESA's SVDs and predictor training on the 2-core reference CPU
#: (benchmarks/lesa_benchmark.py, Llama-3.2-1B shapes: 70.5 TFLOP in 25 min, 46.6 GFLOP/s)
CPU_FLOPS = 45e9


@dataclass(frozen=True)
class LesaCost:
    groups: int  # projection types (one SVD and one predictor each)
    flops: float
    largest: tuple[int, int]  # the biggest stacked matrix factored
    peak_bytes: int  # the biggest fit: its layers, the stack, U, V^T and LAPACK's workspace

    @property
    def cpu_seconds(self) -> float:
        return self.flops / CPU_FLOPS


def lesa_cost(plan: Plan) -> LesaCost | None:
    """The work of every ``lesa`` op of ``plan``, or None when it has none."""
    if plan.lesa is None:
        return None
    shapes: dict[tuple[str, str], tuple[int, int]] = {}
    for op in plan.tensors:
        if op.op == "lesa":
            shapes[(op.source, plan.split_layer_key(op.source_name)[1])] = (op.shape[0], op.shape[1])
    if not shapes:
        return None
    flops, largest, peak = 0.0, (0, 0), 0
    h, epochs = plan.lesa.hidden, plan.lesa.epochs
    for (source, _), (out, width) in shapes.items():
        layers = plan.sources[source].num_layers
        m, n = sorted((out, layers * width))
        flops += 4 * m * m * n + 8 * m**3
        k = min(out, layers * width)
        flops += epochs * k * max(layers - 2, 0) * 6 * h * (3 * width + h)
        if m * n > largest[0] * largest[1]:
            largest = (out, layers * width)
            # float32 layers + stack + V^T + LAPACK's copy and workspace (~5 m n) and U with gesdd's m x m
            # buffers (~5 m^2): 6.3 GiB for Llama-3.2-1B's MLP, 6.6 GiB measured with torch's own 0.3 GiB
            peak = 4 * (5 * m * n + 5 * m * m)
    return LesaCost(groups=len(shapes), flops=flops, largest=largest, peak_bytes=peak)


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------
# verify's peak memory
# --------------------------------------------------------------------------------------------

#: Bytes per element of the compute dtypes verify offers, and of the precisions a stage names.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Largest slice of a stored tensor verify converts at once (bytes as stored). While a slice is converted, the
#: stored slice, its rounding, its compute-dtype copy and the NaN mask coexist: about 4 x CHUNK.
CHUNK = 16 << 20


@dataclass
class PeakEstimate:
    weights: int  # the largest unit of weights resident at once, in the compute dtype
    largest_unit: str
    activations: int  # recorded residuals, logits and their softmaxes
    total: int

    def describe(self) -> str:
        return (
            f"expected peak memory ~{_gb(self.total)} above the interpreter (torch, transformers and the model "
            f"code: ~0.4 GB on CPU): the largest unit of weights ({self.largest_unit}) {_gb(self.weights)} + "
            f"activations {_gb(self.activations)}"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def verify_peak(plan: Plan, *, batch: int, length: int, dtype: str = "float32", whole: bool = False) -> PeakEstimate:
    """What verify holds at its peak, from the plan's output shapes alone (no tensor read).

    Streamed: one unit at a time (a decoder layer, the embedding, the head), each in the compute
    dtype, plus the copies of one slice of at most ``CHUNK`` stored bytes while it is converted. The base model's
    units are its layers, which the output copies (or widens), so the output's largest unit bounds
    both. Whole: both models at once. Activations: the residual after every layer of both models,
    and both models' logits with their log-softmaxes."""
    size = DTYPE_BYTES[dtype]
    units: dict[str, int] = {}
    largest_stored = 0
    for op in plan.tensors:
        numel = math.prod(op.shape)
        key = f"layer {op.layer}" if op.layer is not None else op.name
        units[key] = units.get(key, 0) + numel * size
        largest_stored = max(largest_stored, 4 * min(op.nbytes, CHUNK))
    if not units:
        raise TliError("plan.json lists no tensors; nothing to verify")
    decoder = plan.config
    for key in plan.decoder_config_path:
        decoder = decoder.get(key) or {}
    hidden = int(decoder.get("hidden_size") or 0)
    vocab = int(plan.vocab_size or 0)
    base_layers = plan.sources[plan.base_model].num_layers
    tokens = batch * length
    activations = (base_layers + len(plan.layers) + 4) * tokens * hidden * 4 + 2 * 3 * tokens * vocab * 4
    if whole:
        # the base's parameters: the output's less what injection and upcycling added (approximately)
        base_weights = plan.totals.parameters_before * size
        out_weights = sum(units.values())
        return PeakEstimate(out_weights + base_weights, "both models whole", activations,
                            out_weights + base_weights + activations)  # fmt: skip
    name, weights = max(units.items(), key=lambda kv: kv[1])
    weights += largest_stored
    return PeakEstimate(weights, name, activations, weights + activations)


#: verify's defaults (``--batch``, ``--length``, ``--dtype``): what `plan` estimates its peak for.
VERIFY_BATCH, VERIFY_LENGTH, VERIFY_DTYPE = 2, 24, "float32"


# --------------------------------------------------------------------------------------------
# A training stage's memory per device
# --------------------------------------------------------------------------------------------

PARTS = ("weights", "gradients", "optimizer")


@dataclass(frozen=True)
class StageMemory:
    """A stage's memory per device, by part (bytes; see the module docstring for the rules). ``whole`` holds
    each part over all processes together; ``sharded`` parts are divided over ``world_size`` processes;
    ``offloaded`` parts live in CPU memory and take no device memory. Activations are not counted."""

    stage: str
    setup: str  # "ddp", "fsdp", "deepspeed ZeRO-3", with " + offload"
    trainable: int  # elements that train
    trainable_bytes: int  # bytes per trainable element as the optimizer sees it (its weight, gradient, moments)
    whole: dict[str, int]
    sharded: tuple[str, ...]
    offloaded: tuple[str, ...]
    world_size: int
    world_size_given: bool
    notes: tuple[str, ...] = field(default=())

    def per_device(self, part: str) -> int:
        if part in self.offloaded:
            return 0
        return -(-self.whole[part] // self.world_size) if part in self.sharded else self.whole[part]

    @property
    def total(self) -> int:
        return sum(self.per_device(p) for p in PARTS)

    def to_json(self) -> dict:
        return {
            "stage": self.stage,
            "setup": self.setup,
            "trainable_parameters": self.trainable,
            "bytes_per_trainable_parameter": self.trainable_bytes,
            "world_size": self.world_size,
            "world_size_given": self.world_size_given,
            "per_device_bytes": {p: self.per_device(p) for p in PARTS} | {"total": self.total},
            "all_processes_bytes": dict(self.whole),
            "sharded": list(self.sharded),
            "offloaded": list(self.offloaded),
            "notes": list(self.notes),
        }


def _numel(shape) -> int:
    return math.prod(shape)


def stage_memory(plan: Plan, stage: StagePlan, world_size: int | None = None) -> StageMemory:
    """The weights, gradients and Adam state of ``stage`` per device, from the plan's counts (see the module
    docstring). ``world_size``: the number of processes (GPUs); None: one, with the sharded parts named."""
    n = world_size or 1
    mixed = stage.settings.precision != "float32"
    dist = stage.distributed
    trainable = stage.trainable_parameters
    stored = sum(op.nbytes for op in plan.tensors)
    elements = sum(_numel(op.shape) for op in plan.tensors)
    notes: list[str] = []
    if stage.lora is not None:
        bits = stage.settings.lora.quantize if stage.settings.lora is not None else None
        if bits:
            # bitsandbytes quantizes the decoder layers' linear weights; peft upcasts every other weight to float32
            matrices = sum(_numel(op.shape) for op in plan.tensors if op.layer is not None and len(op.shape) == 2)
            base = matrices * bits // 8 + (elements - matrices) * 4
            notes.append(f"base weights: decoder matrices at {bits} bits, the rest float32 (quantization constants "
                         "not counted)")  # fmt: skip
        else:
            base = stored
        per = 4  # peft keeps the adapters in float32
        weights = base + trainable * per
        all_elements = elements + trainable
    else:
        names = set(stage.parameters)
        ops = [op for op in plan.tensors if op.name in names]
        numel = sum(_numel(op.shape) for op in ops)
        per = round(sum(op.nbytes for op in ops) / numel) if numel else DTYPE_BYTES.get(plan.dtype, 4)
        weights = stored + (trainable - numel) * per  # the MoD head, if any, in the weights' dtype
        all_elements = elements + trainable - numel
    if dist.strategy == "deepspeed":
        zero = dist.zero_stage or 3  # compile_plan resolves it; 3 is the recipe default
        setup = f"deepspeed ZeRO-{zero}"
        if mixed:
            weights, per = all_elements * 2, 2  # the engine casts the model to the 16-bit precision
        optimizer = trainable * (8 + (4 if per < 4 else 0))  # float32 moments and master copy
        whole = {"weights": weights, "gradients": trainable * per, "optimizer": optimizer}
        sharded = ("weights", "gradients", "optimizer") if zero == 3 else ("gradients", "optimizer")
        offloaded = (("weights", "optimizer") if zero == 3 else ("optimizer",)) if dist.offload else ()
        per_optimizer = 12 if per < 4 else 8
    else:
        setup = dist.strategy
        if dist.strategy == "fsdp" and mixed and per < 4:
            weights += trainable * (4 - per)  # accelerate upcasts the trainable weights to float32
            per = 4
        whole = {"weights": weights, "gradients": trainable * per, "optimizer": 2 * trainable * per}
        sharded = PARTS if dist.strategy == "fsdp" else ()
        offloaded = PARTS if dist.strategy == "fsdp" and dist.offload else ()
        per_optimizer = 2 * per
    if dist.offload:
        setup += " + offload"
    return StageMemory(
        stage=stage.name,
        setup=setup,
        trainable=trainable,
        trainable_bytes=per + per + per_optimizer,
        whole=whole,
        sharded=tuple(sharded),
        offloaded=tuple(offloaded),
        world_size=n,
        world_size_given=world_size is not None,
        notes=tuple(notes),
    )


def estimates(plan: Plan, world_size: int | None = None) -> dict:
    """What `plan --json` adds beside the plan: each stage's memory per device and verify's peak."""
    peak = verify_peak(plan, batch=VERIFY_BATCH, length=VERIFY_LENGTH, dtype=VERIFY_DTYPE) if plan.tensors else None
    return {
        "activations_counted": False,
        "world_size": world_size,
        "stages": [stage_memory(plan, s, world_size).to_json() for s in plan.stages],
        "verify": None
        if peak is None
        else {
            "batch": VERIFY_BATCH,
            "length": VERIFY_LENGTH,
            "dtype": VERIFY_DTYPE,
            "mode": "streamed",
            "largest_unit": peak.largest_unit,
            "weights_bytes": peak.weights,
            "activations_bytes": peak.activations,
            "total_bytes": peak.total,
        },
    }
