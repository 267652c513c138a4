"""The function check of verify: base and output run on the same tokens, compared layer by layer.

Two ways to run a model, one comparison:

* **streamed** (the default): the model is built with transformers' own classes on the meta
  device (no weight is allocated), and each unit of weights (the embedding, one decoder layer, the
  head) is materialised from the memory-mapped safetensors just before transformers' own forward
  reaches it, and dropped right after. The forward is the model's own (``model(input_ids)``): masks,
  sliding windows, rotary embeddings, MoE routing and post-norms are transformers', not a copy of
  them. Checkpoint names become module names through transformers' own loading code (its renamings
  and the MoE expert fusion), so the weights land where ``from_pretrained`` would put them. Peak
  memory: the largest unit of either model in the compute dtype, plus activations.
* **whole** (``--whole``): both models loaded whole with ``from_pretrained``, as before.

Either way a forward hook on every decoder layer records the residual stream after it, and the
report compares each output layer with the base layer the plan's layer map puts at the same
position (an injected layer with the layer it copies), then the final logits: max |difference|,
KL divergence and top-1 agreement. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import math
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tli_recipe.errors import TliError
from tli_recipe.plan.cost import CHUNK, DTYPE_BYTES, PeakEstimate, verify_peak
from tli_recipe.plan.model import Plan
from tli_recipe.source.checkpoint import open_checkpoint

#: Safetensors dtype codes -> compute dtype names (``--dtype stored``).
STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class LayerRow:
    """One output layer in the report."""

    output: int
    role: str  # original | injected
    source: str  # source key in plan.sources
    layer: int  # source layer index
    base_layer: Optional[int]  # the base layer at the same position; None when the layer is not the base's
    max_abs_diff: Optional[float]  # max |residual(output) - residual(base)| after this layer
    base_scale: Optional[float]  # max |residual(base)| there (the tolerance scales with it)


@dataclass
class FunctionCheck:
    """What the function check measured."""

    mode: str  # streamed | whole
    inputs: str  # "random ids (seed 0)" or "text FILE"
    tokens: int
    dtype: str
    device: str
    layers: list[LayerRow] = field(default_factory=list)
    logits_max_abs_diff: float = 0.0
    logits_scale: float = 0.0  # max |base logits|
    logits_tolerance: float = 0.0  # atol x max(1, logits_scale): what a function-preserving plan must meet
    kl_divergence: float = 0.0  # mean over tokens of KL(base || output), nats
    top1_agreement: float = 1.0  # share of tokens whose argmax agrees
    first_divergent_layer: Optional[int] = None  # first output layer beyond the tolerance
    nonfinite: list[str] = field(default_factory=list)  # "<model>: <tensor>" holding NaN or inf
    expected_peak_bytes: int = 0
    base_source: str = ""  # the base model's key in plan.sources (shown as "base" in the table)
    residual_copies: int = 1  # widen (hidden x n): the output's residual is n copies, each compared with the base's

    def to_json(self) -> dict:
        return asdict(self)


def all_finite(t) -> bool:
    """No NaN or inf in ``t``. A sum is non-finite whenever an element is (NaN propagates, inf stays inf
    or makes NaN). It is taken in ``t``'s own dtype: torch's bf16/fp16 sum accumulates in float32 inside
    and rounds only the result, and is 15x faster on CPU than a sum with ``dtype=float32`` (5 ms against
    80 ms for 16M bf16 values, which are first converted) and 20x faster than ``isfinite(t).all()``.
    Only a non-finite sum, which an overflow of finite values can also give (more often in fp16), is
    confirmed element by element."""
    import torch

    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def layer_tolerance(atol: float, base_scale: Optional[float]) -> float:
    """A difference counts above ``atol`` times the size of the base's values (at least 1): float rounding
    is relative. A plan that is exact by construction (TLI's zeroed projections) gives 0 at every layer;
    one that is exact only up to rounding (MoE experts weighted by a random router, which sum to 1 only
    up to rounding) gives a few ulps of values that, in real models, reach thousands in the residual
    stream and tens in the logits: measured on SmolLM2-135M upcycled to 4 experts, 5.3e-5 at logits of
    max |value| ~20."""
    return atol * max(1.0, base_scale or 0.0)


# --------------------------------------------------------------------------------------------
# Expected peak memory, from the plan's shapes
# --------------------------------------------------------------------------------------------


def estimate_peak(plan: Plan, *, batch: int, length: int, dtype: str = "float32", whole: bool = False) -> PeakEstimate:
    """What verify holds at its peak, from the plan's shapes alone: the arithmetic is
    :func:`tli_recipe.plan.cost.verify_peak`, torch-free, so `plan` prints it too."""
    return verify_peak(plan, batch=batch, length=length, dtype=dtype, whole=whole)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def input_vocab(plan: Plan) -> Optional[int]:
    """How many token ids the inputs may use: the rows of the embedding the plan writes (plan.vocab_size
    when there is none), below any image-token id of a vision-language config, which would ask for an image."""
    rows = [op.shape[0] for op in plan.tensors if op.layer is None and op.name.endswith("embed_tokens.weight")]
    vocab = min(rows) if rows else plan.vocab_size
    special = [
        v
        for k, v in plan.config.items()
        if k in ("image_token_index", "image_token_id", "boi_token_index", "eoi_token_index")
        and isinstance(v, int)
        and not isinstance(v, bool)
        and v >= 0
    ]
    if vocab and special:
        vocab = min([vocab, *special])
    return vocab


def random_ids(vocab: int, batch: int, length: int, seed: int):
    import torch

    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def text_ids(text_file: Path, tokenizer_dir: Path, batch: int, length: int, vocab: int):
    """``batch`` rows of ``length`` consecutive tokens of the text, tokenised by the base's tokenizer."""
    import torch

    # Enough bytes for any tokenizer to give batch * length tokens (a token is rarely over 64 bytes), and no
    # more: a hostile --text (a device, a huge file) is neither read whole nor waited on.
    limit = max(1 << 20, batch * length * 64)
    try:
        if not stat.S_ISREG(Path(text_file).stat().st_mode):
            raise TliError(f"{text_file}: not a regular file; --text reads a UTF-8 text file")
        with open(text_file, "rb") as f:
            text = f.read(limit).decode(
                "utf-8", errors="ignore" if Path(text_file).stat().st_size > limit else "strict"
            )
    except (OSError, UnicodeDecodeError) as exc:
        raise TliError(f"{text_file}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a folder without a tokenizer
        raise TliError(
            f"{tokenizer_dir}: no tokenizer transformers can load ({type(exc).__name__}); --text needs the base "
            "model's tokenizer files; leave --text out to measure on random token ids"
        ) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch * length
    if len(ids) < need:
        raise TliError(
            f"{text_file}: {len(ids)} tokens, verify needs {need} ({batch} rows of {length}); give a longer text "
            "or a smaller --batch/--length"
        )
    if max(ids[:need]) >= vocab:
        raise TliError(f"{tokenizer_dir}: the tokenizer gives ids beyond the model's vocabulary of {vocab}")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(batch, length)


# --------------------------------------------------------------------------------------------
# Running a model: the decoder layers of a transformers model, recorded by hooks
# --------------------------------------------------------------------------------------------


def decoder_layers(model) -> tuple[str, list]:
    """The qualified name and modules of the decoder layer list (``model.layers``,
    ``model.language_model.layers``): the longest ModuleList of ``*DecoderLayer`` modules."""
    import torch

    best = ("", [])
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module)
            and type(module[0]).__name__.endswith("DecoderLayer")
        ):
            if len(module) > len(best[1]):
                best = (name, list(module))
    if not best[1]:
        raise TliError(f"{type(model).__name__}: no list of decoder layers found; verify cannot compare it by layer")
    return best


def _record(layers: list, hidden: list) -> list:
    """Forward hooks keeping the residual stream after each layer (float32, on the CPU)."""
    handles = []
    for i, layer in enumerate(layers):

        def keep(module, args, output, i=i):
            out = output[0] if isinstance(output, (tuple, list)) else output
            hidden[i] = out.detach().float().cpu()

        handles.append(layer.register_forward_hook(keep))
    return handles


def _forward(model, ids, device: str):
    import torch

    with torch.no_grad():
        out = model(input_ids=ids.to(device), use_cache=False)
    return out.logits.detach().float().cpu()


def _load_error(path: str, exc: Exception) -> TliError:
    return TliError(
        f"{path}: transformers cannot load this model ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); check its config.json "
        "and weights (a model that needs custom code is not supported)"
    )


def run_whole(path: str, ids, *, device: str, dtype, round_to=None, nonfinite: list, label: str):
    """The model loaded whole with from_pretrained: (residual after each layer, logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad folder; name the folder instead
        raise _load_error(path, exc) from None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not all_finite(p):
                nonfinite.append(f"{label}: {name}")
            if round_to is not None:
                p.copy_(p.to(round_to).to(torch.float32))
    model.to(device=device, dtype=dtype).eval()
    _, layers = decoder_layers(model)
    hidden: list = [None] * len(layers)
    handles = _record(layers, hidden)
    logits = _forward(model, ids, device)
    for h in handles:
        h.remove()
    del model
    return hidden, logits


class _StreamedModel:
    """A transformers model on the meta device whose weights arrive one unit at a time."""

    def __init__(self, path: str, *, device: str, dtype, round_to, nonfinite: list, label: str) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.path, self.device, self.dtype, self.round_to = path, device, dtype, round_to
        self.nonfinite, self.label = nonfinite, label
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        except Exception as exc:  # as in from_pretrained: name the folder
            raise _load_error(path, exc) from None
        self.model = model.eval()
        self._real_buffers(model)
        self.mapping = get_model_conversion_mapping(model)
        self.checkpoint = open_checkpoint(Path(path))
        self.layer_list, self.layers = decoder_layers(model)
        self.units = self._units()
        self.twins = self._find_twins()
        # Weight buffers of the last freed decoder layer, by (shape, dtype), for the next layer to read
        # into (CPU only): see _empty.
        self._pool: dict[tuple, list] = {}

    # -- building ------------------------------------------------------------------------------

    def _real_buffers(self, model) -> None:
        """Buffers (rotary frequencies, Gemma's embedding scale) are computed, not loaded: give each module
        that owns one real storage and let the model's own ``_init_weights`` fill it, as from_pretrained does."""
        import torch

        for module in model.modules():
            names = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
            if not names:
                continue
            for n in names:
                buf = module._buffers[n]
                module._buffers[n] = torch.empty_like(buf, device=self.device)
            with torch.no_grad():
                model._init_weights(module)

    def _units(self) -> dict[str, list[str]]:
        """Checkpoint tensor names by unit: ``layer N``, ``embed``, ``head``, or the module that owns them."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.model
        meta = model.state_dict()
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        names = {id(m): n for n, m in model.named_modules()}
        embed = names.get(id(model.get_input_embeddings()))
        head_module = model.get_output_embeddings()
        head = names.get(id(head_module)) if head_module is not None else None
        self.param_of: dict[str, str] = {}  # checkpoint name -> model parameter name
        units: dict[str, list[str]] = {}
        for key in self.checkpoint.tensors:
            renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if renamed not in meta and key in meta:
                renamed = key
            if renamed not in meta:
                raise TliError(
                    f"{self.path}: tensor '{key}' has no place in {type(model).__name__} (transformers would "
                    "report it as unexpected); check the checkpoint"
                )
            self.param_of[key] = renamed
            units.setdefault(self._unit_of(renamed, embed, head), []).append(key)
        return units

    def _unit_of(self, param: str, embed: Optional[str], head: Optional[str]) -> str:
        prefix = f"{self.layer_list}."
        if param.startswith(prefix):
            index = param[len(prefix) :].split(".", 1)[0]
            if index.isdigit():
                return f"layer {int(index)}"
        module = param.rpartition(".")[0]
        if module == embed:
            return "embed"
        if module == head:
            return "head"
        return module

    # -- loading and freeing -------------------------------------------------------------------

    def _read(self, keys: list[str]) -> dict:
        """The tensors, each checked for NaN/inf, in the compute dtype; one safe_open per file, closed after.
        A tensor is converted in slices of at most ``CHUNK`` stored bytes, so the stored copy of a large
        tensor (a bf16 embedding) never sits beside its float32 copy whole."""
        import torch
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.checkpoint.tensors[key].file, []).append(key)
        out = {}
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for key in names:
                    info = self.checkpoint.tensors[key]
                    if info.nbytes <= CHUNK or len(info.shape) == 0 or info.shape[0] < 2:
                        t = self._rounded(key, handle.get_tensor(key))
                        if t.is_floating_point():
                            t = self._empty(tuple(t.shape), self.dtype).copy_(t)
                        out[key] = t
                        continue
                    rows = max(1, info.shape[0] * CHUNK // info.nbytes)
                    part = handle.get_slice(key)
                    first = self._rounded(key, part[0:rows])
                    shape = (info.shape[0], *first.shape[1:])
                    whole = (
                        self._empty(shape, self.dtype)
                        if first.is_floating_point()
                        else torch.empty(shape, dtype=first.dtype)
                    )
                    whole[0:rows].copy_(first)  # the cast to the compute dtype happens in this one copy
                    del first
                    for start in range(rows, info.shape[0], rows):
                        whole[start : start + rows].copy_(self._rounded(key, part[start : start + rows]))
                    out[key] = whole
        return out

    def _rounded(self, key: str, t):
        """``t`` checked for NaN/inf and rounded to the output's dtype (the base model only), still in its
        stored precision or that rounding: the caller casts it to the compute dtype."""
        if not t.is_floating_point():
            return t
        if not all_finite(t) and f"{self.label}: {key}" not in self.nonfinite:
            self.nonfinite.append(f"{self.label}: {key}")
        return t.to(self.round_to) if self.round_to is not None else t

    def _empty(self, shape: tuple, dtype):
        """A buffer for one tensor in the compute dtype: the freed previous layer's buffer of the same shape
        where there is one (decoder layers share their shapes), else a new one. Reading into the same
        memory layer after layer spares the kernel from mapping and zeroing fresh pages for every layer
        (about a million page faults on the 1.1B benchmark model) and the allocator from returning them."""
        import torch

        kept = self._pool.get((shape, dtype))
        return kept.pop() if kept else torch.empty(shape, dtype=dtype)

    def load(self, unit: str) -> None:
        import torch
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        keys = self.units.get(unit, [])
        self._trim_pool(unit, keys)
        state = self._read(keys)
        self._pool.clear()  # what this layer did not reuse
        tied = self._tied_sources(unit)
        for source_key in set(tied.values()) - set(state):
            state.update(self._read([source_key]))
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            config = LoadStateDictConfig(dtype=self.dtype, device_map={"": self.device}, weight_mapping=self.mapping)
            plain = {k: v for k, v in state.items() if k in keys}
            info, _ = convert_and_load_state_dict_in_model(self.model, plain, config)
            for param, source_key in tied.items():
                module_name, _, name = param.rpartition(".")
                module = self.model.get_submodule(module_name)
                setattr(module, name, torch.nn.Parameter(state[source_key].to(self.device), requires_grad=False))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys or info.unexpected_keys:
            found = sorted(info.mismatched_keys or info.unexpected_keys, key=str)[0]
            raise TliError(
                f"{self.path}: {unit}: {found} does not fit {type(self.model).__name__}; check the checkpoint"
            )
        prefix = self._prefix(unit)
        for local, p in self._module(unit).named_parameters():
            if p.is_meta:
                raise TliError(f"{self.path}: no tensor in the checkpoint for '{prefix}{local}'; check the checkpoint")

    def _tied_sources(self, unit: str) -> dict[str, str]:
        """Parameters of ``unit`` stored under another name: a tied head reads the embedding's tensor."""
        return {p: key for p, key in self.twins.items() if p == unit or p.startswith(self._prefix(unit))}

    def _prefix(self, unit: str) -> str:
        module = self._module(unit)
        name = {id(m): n for n, m in self.model.named_modules()}.get(id(module), "")
        return f"{name}." if name else ""

    def _find_twins(self) -> dict[str, str]:
        """Model parameters with no tensor of their own in the checkpoint, tied (the same Parameter, as
        built) to one that has: parameter name -> the checkpoint name to read."""
        by_param = {p: k for k, p in self.param_of.items()}
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        twins = {}
        for names in groups.values():
            have = [n for n in names if n in by_param]
            for n in names:
                if n not in by_param and have:
                    twins[n] = by_param[have[0]]
        return twins

    def _module(self, unit: str):
        if unit.startswith("layer "):
            return self.layers[int(unit.split()[1])]
        if unit == "embed":
            return self.model.get_input_embeddings()
        if unit == "head":
            return self.model.get_output_embeddings()
        return self.model.get_submodule(unit) if unit else self.model

    def free(self, unit: str) -> None:
        import torch

        module = self._module(unit)
        pooled = unit.startswith("layer ")
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    if pooled and p.device.type == "cpu" and p.is_floating_point() and p.dtype == self.dtype:
                        self._pool.setdefault((tuple(p.shape), p.dtype), []).append(p.data)
                    sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        if not pooled:
            _return_freed_memory()

    def _trim_pool(self, unit: str, keys: list[str]) -> None:
        """Drop the pooled buffers that ``unit`` will not read into, before it allocates its own, so that
        at most one layer's weights are resident: all of them for a unit that is not a decoder layer (the
        head after the last layer), the unmatched ones for a layer of another shape (a dense layer after
        an MoE one)."""
        if not self._pool:
            return
        if not unit.startswith("layer "):
            self._pool.clear()
            _return_freed_memory()
            return
        wanted = Counter(tuple(self.checkpoint.tensors[key].shape) for key in keys)
        for (shape, dtype), buffers in list(self._pool.items()):
            del buffers[wanted.get(shape, 0) :]
            if not buffers:
                del self._pool[(shape, dtype)]

    # -- running -------------------------------------------------------------------------------

    def run(self, ids):
        """(residual after each layer, logits): each unit loaded by a pre-hook and freed by a hook."""
        hidden: list = [None] * len(self.layers)
        handles = _record(self.layers, hidden)
        streamed = {f"layer {i}" for i in range(len(self.layers))} | {"embed", "head"}
        kept = [u for u in self.units if u not in streamed]
        for unit in [f"layer {i}" for i in range(len(self.layers))] + ["embed", "head"]:
            module = self._module(unit)
            if module is None:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, a, unit=unit: self.load(unit)))
            handles.append(module.register_forward_hook(lambda m, a, o, unit=unit: self.free(unit)))
        # Small tensors outside the layers (the final norm) load on their module's first call and stay;
        # modules that never run on text (a vision tower) are never read.
        for unit in kept:
            handles.append(self._module(unit).register_forward_pre_hook(self._once(unit)))
        try:
            logits = _forward(self.model, ids, self.device)
        finally:
            for h in handles:
                h.remove()
        return hidden, logits

    def _once(self, unit: str) -> Callable:
        done = []

        def hook(module, args):
            if not done:
                self.load(unit)
                done.append(unit)

        return hook


def _return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc): tensors of a few MB are allocated from the heap
    and, freed, stay in the process. Measured on the 1.1B benchmark model: without this, the resident
    set grows by ~65 MB per decoder layer (1.8 GB after 16 layers); with it, it stays at ~1.0 GB."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to call
        pass


def run_streamed(path: str, ids, *, device: str, dtype, round_to=None, nonfinite: list, label: str):
    streamed = _StreamedModel(path, device=device, dtype=dtype, round_to=round_to, nonfinite=nonfinite, label=label)
    return streamed.run(ids)


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def compare(plan: Plan, base_hidden: list, base_logits, out_hidden: list, out_logits, *, atol: float, check):
    """Fill ``check`` (a FunctionCheck) from both models' recorded residuals and logits."""
    import torch

    for entry, got in zip(plan.layers, out_hidden):
        mapped = entry.layer if entry.source == plan.base_model else None
        diff = scale = None
        if mapped is not None and mapped < len(base_hidden) and got is not None and base_hidden[mapped] is not None:
            want = base_hidden[mapped]
            if got.shape[-1] != want.shape[-1] and got.shape[-1] % want.shape[-1] == 0:
                # a widened residual stream (hidden x n) is n copies of the base's: compare each copy
                check.residual_copies = got.shape[-1] // want.shape[-1]
                got = got.reshape(*got.shape[:-1], check.residual_copies, want.shape[-1])
                want = want.unsqueeze(-2)
            diff = float((got - want).abs().max())
            scale = float(want.abs().max())
        row = LayerRow(entry.output, entry.role, entry.source, entry.layer, mapped, diff, scale)
        check.layers.append(row)
        if check.first_divergent_layer is None and (
            diff is None or not math.isfinite(diff) or diff > layer_tolerance(atol, scale)
        ):
            check.first_divergent_layer = entry.output
    check.logits_max_abs_diff = float((out_logits - base_logits).abs().max())
    check.logits_scale = float(base_logits.abs().max())
    check.logits_tolerance = layer_tolerance(atol, check.logits_scale)
    base_log = torch.log_softmax(base_logits.double(), dim=-1)
    out_log = torch.log_softmax(out_logits.double(), dim=-1)
    kl = (base_log.exp() * (base_log - out_log)).sum(-1)
    check.kl_divergence = float(kl.mean())
    check.top1_agreement = float((base_logits.argmax(-1) == out_logits.argmax(-1)).double().mean())


def check_function(
    plan: Plan,
    folder: Path,
    *,
    atol: float = 1e-5,
    whole: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    text: Optional[Path] = None,
    batch: int = 2,
    length: int = 24,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> FunctionCheck:
    """Run base and output on the same tokens and compare them layer by layer (see the module docstring).

    ``dtype``: the compute dtype (float32, bfloat16, float16, or ``stored``: the output's stored dtype).
    When the output's dtype is lower than the base's, the base weights are rounded to it first, so the
    comparison measures the layer map, not the cast."""
    import torch

    if dtype == "stored":
        dtype = STORED.get(plan.tensors[0].dtype, "float32") if plan.tensors else "float32"
    if dtype not in DTYPE_BYTES:
        raise TliError(f"--dtype: {dtype!r} is not one of {', '.join([*DTYPE_BYTES, 'stored'])}")
    if batch < 1 or length < 1:
        raise TliError("--batch and --length must be >= 1")
    base_path = plan.sources[plan.base_model].path
    vocab = input_vocab(plan)
    if not vocab:
        raise TliError(
            f"{folder}: plan.json names no vocabulary size, so no input ids can be drawn; "
            "check the config, or pass --no-logits"
        )
    if text is not None:
        ids = text_ids(text, Path(base_path), batch, length, vocab)
        inputs = f"text {text}"
    else:
        ids = random_ids(vocab, batch, length, seed)
        inputs = f"random ids (seed {seed})"
    estimate = estimate_peak(plan, batch=batch, length=length, dtype=dtype, whole=whole)
    log(f"verify: {'whole models' if whole else 'streamed, one layer at a time'}, {dtype} on {device}; "
        f"{estimate.describe()}")  # fmt: skip
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TliError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    check = FunctionCheck(
        mode="whole" if whole else "streamed",
        inputs=inputs,
        tokens=ids.numel(),
        dtype=dtype,
        device=device,
        expected_peak_bytes=estimate.total,
        base_source=plan.base_model,
    )
    compute = getattr(torch, dtype)
    # Only a recipe dtype casts the weights; without one every tensor kept its own dtype.
    cast = plan.recipe_dtype
    round_to = getattr(torch, cast) if cast and cast != "float32" else None
    run = run_whole if whole else run_streamed
    base_hidden, base_logits = run(
        base_path, ids, device=device, dtype=compute, round_to=round_to, nonfinite=check.nonfinite, label="base"
    )
    out_hidden, out_logits = run(
        str(folder), ids, device=device, dtype=compute, nonfinite=check.nonfinite, label="output"
    )
    compare(plan, base_hidden, base_logits, out_hidden, out_logits, atol=atol, check=check)
    return check


# --------------------------------------------------------------------------------------------
# Showing it
# --------------------------------------------------------------------------------------------


def report_table(check: FunctionCheck, *, atol: float, preserving: bool) -> list[str]:
    """The text report: one line per output layer, then the logits."""
    lines = [f"function check ({check.mode}, {check.dtype} on {check.device}, {check.tokens} tokens of {check.inputs})"]
    if check.residual_copies > 1:
        lines.append(
            f"  the output's residual stream is {check.residual_copies} copies of the base's (widen): each copy is "
            "compared with the base's residual"
        )
    lines.append(f"  {'layer':>5}  {'from':<10} {'role':<9} {'max |diff| to base':>19}")
    for row in check.layers:
        origin = f"{'base' if row.source == check.base_source else row.source}:{row.layer}"
        if row.max_abs_diff is None:
            shown = "(not the base's)"
        else:
            shown = f"{row.max_abs_diff:.3g}"
            if row.max_abs_diff > layer_tolerance(atol, row.base_scale):
                shown += " *"
        lines.append(f"  {row.output:>5}  {origin:<10} {row.role:<9} {shown:>19}")
    lines.append(
        f"  logits: max |diff| {check.logits_max_abs_diff:.3g}, KL(base||output) {check.kl_divergence:.3g} nats, "
        f"top-1 agreement {check.top1_agreement:.1%}"
    )
    if check.first_divergent_layer is not None:
        note = "" if preserving else " (the plan is not function-preserving: information, not failure)"
        lines.append(f"  first layer beyond tolerance (*): {check.first_divergent_layer}{note}")
    else:
        lines.append("  every layer within tolerance of the base")
    return lines


def plot_report(check: FunctionCheck, path: Path, *, atol: float) -> None:
    """A small plot of the residual difference by output layer (log scale), injected layers marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TliError("-o: the plot needs matplotlib (pip install matplotlib); --json gives the numbers") from None
    rows = [r for r in check.layers if r.max_abs_diff is not None]
    floor = 1e-12
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = [r.output for r in rows]
    ys = [max(r.max_abs_diff, floor) for r in rows]
    ax.plot(xs, ys, "-o", ms=3, color="tab:blue", label="max |residual - base residual|")
    inj = [(r.output, max(r.max_abs_diff, floor)) for r in rows if r.role == "injected"]
    if inj:
        ax.scatter(*zip(*inj), color="tab:red", zorder=3, s=20, label="injected layer")
    tol = [layer_tolerance(atol, r.base_scale) for r in rows]
    ax.step(xs, tol, where="mid", color="grey", ls="--", lw=1, label=f"tolerance ({atol:g} x max(1, max |base|))")
    ax.set_yscale("log")
    ax.set_xlabel("output layer")
    ax.set_ylabel(f"max |diff| (0 shown as {floor:g})")
    ax.set_title(
        f"logits: max |diff| {check.logits_max_abs_diff:.2g}, KL {check.kl_divergence:.2g}, "
        f"top-1 {check.top1_agreement:.0%}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise TliError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
