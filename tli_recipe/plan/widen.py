"""Width growth (function-preserving), steps of compile_plan: ``resolve_widen`` checks the recipe's
``widen:`` target sizes against the base model and builds one dimension map per width that grows
(residual, intermediate, heads, kv_heads); ``widen_ops`` turns each output tensor that touches a
growing width into a ``widen`` op (a gather through those maps, reading sides scaled). Pure data.

The constructions (docs/widen.md):

- a dimension map copies units: output unit i is source unit ``index[i]``; the first ``before``
  units are the source's own. Where a tensor *writes* a dimension (rows of q/k/v/gate/up, of
  o/down for the residual, norm gains, biases, the embedding's columns) it is a plain gather;
  where it *reads* one (columns) each copy is scaled by its share, and the shares of one source
  unit sum to 1 (``split``: seeded uneven shares; ``zero``: 1 for the original, 0 for the copies;
  the residual: 1/n each, HyperCloning's symmetric expansion). Copies read identical inputs, so
  the sum, the function, is unchanged.
- heads keep their head_dim and the GQA ratio: a new KV head copies a seeded-chosen one, and the
  query heads of its group copy the query heads of that one's group, in order, so every query
  head still reads a KV head equal to the one its original reads.
- hidden size x n: every width that reads or writes the residual is gathered n times; tied
  embeddings fold 1/n into the final norm gain (the head is the tiled embedding).
- noise (``noise > 0``): +N on one copy's reading-side block and -N on another copy's of the same
  unit; both read the same values, so the sum is unchanged while their gradients differ.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from tli_recipe.plan.model import DimMap, TensorOp, WidenAxis, WidenPlan, tensor_seed
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.sources import Sources
from tli_recipe.recipe.schema import Recipe

#: Architecture definitions (and the model types within them) whose constructions are checked
#: against transformers on tiny models (tests/execute/test_widen.py).
SUPPORTED = {
    "llama": ("llama", "mistral"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text",),
}

#: Architectures whose model multiplies the embedding output by sqrt(hidden_size): widened n times,
#: that factor grows by sqrt(n), so the tiled embedding is divided by sqrt(n).
EMBED_SCALED = ("gemma2", "gemma3")

ORDER = (
    "slices, then inject, then widen (every output layer, injected ones included, is widened alike), then upcycle "
    "(each expert a copy of the widened MLP)"
)

#: Per projection of a decoder layer: the dimension of axis 0 (rows: written) and of axis 1
#: (columns: read) of its weight; a bias or a norm gain has axis 0 only.
LAYER_AXES: dict[str, tuple[Optional[str], Optional[str]]] = {
    "input_layernorm": ("residual", None),
    "post_attention_layernorm": ("residual", None),
    "pre_feedforward_layernorm": ("residual", None),  # Gemma's sandwich norms act on the residual width
    "post_feedforward_layernorm": ("residual", None),
    "q_proj": ("heads", "residual"),
    "k_proj": ("kv_heads", "residual"),
    "v_proj": ("kv_heads", "residual"),
    "o_proj": ("residual", "heads"),
    "gate_proj": ("intermediate", "residual"),
    "up_proj": ("intermediate", "residual"),
    "down_proj": ("residual", "intermediate"),
    "q_norm": (None, None),  # per head_dim: unchanged
    "k_norm": (None, None),
}

#: The config keys widening writes (rewrite_config refuses them in output_config).
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


class BothConfigs:
    """Two growth steps' config keys (upcycle, then widen) through rewrite_config's one slot."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    @property
    def owned(self) -> set[str]:
        return set(self.first.owned) | set(self.second.owned)

    def apply(self, rw) -> None:
        self.first.apply(rw)
        self.second.apply(rw)


@dataclass
class Widening:
    plan: WidenPlan
    tied: bool

    # rewrite_config's interface for the keys a growth step owns (as UpcycleConfig)
    @property
    def owned(self) -> set[str]:
        return set(CONFIG_KEYS)

    def apply(self, rw) -> None:
        for key, value in self.plan.config.items():
            before = self.plan.before.get(key)
            why = "width growth" if value != before else "width growth: written explicitly"
            if key == "head_dim" and key not in rw.decoder:
                why = "width growth: explicit, or transformers derives hidden_size // num_attention_heads"
            rw.change(key, value, why)


def _nearest(value: int, step: int, least: int) -> str:
    lo = max(least, value // step * step)
    hi = max(least, -(-value // step) * step)
    return str(lo) if lo == hi else f"{lo} or {hi}"


def resolve_widen(recipe: Recipe, sources: Sources, problems: Problems) -> Optional[Widening]:
    """The dimension maps of ``recipe.widen`` against the base model; None (and problems) when refused."""
    w = recipe.widen
    if w is None:
        return None
    arch = sources.arch
    model_type = sources.base_config.get("model_type")
    if arch.name not in SUPPORTED or model_type not in SUPPORTED[arch.name]:
        supported = ", ".join(t for types in SUPPORTED.values() for t in types)
        problems.add(
            ("widen",),
            f"widening {model_type or arch.name} models is not supported: exact constructions are checked for "
            f"{supported} only (Phi-3's fused projections, OLMo 2's post-norm blocks, Granite's multipliers and "
            "multimodal or MoE models are not built); expected a model of those types",
            prefer_key=True,
        )
        return None
    if recipe.upcycle is not None and recipe.upcycle.router.kind == "hidden":
        problems.add(
            ("widen",),
            "widen together with the hidden router init is not supported (it runs the source model, whose "
            "hidden states have the source's width); expected upcycle.router zero or {random: std}",
            prefer_key=True,
        )
        return None
    cfg = arch.names(sources.configs[sources.base])
    sizes = {}
    for key in CONFIG_KEYS:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.add(("widen",), f"config.json of {sources.base}: {key} is {value!r}; expected a positive integer")
            return None
        sizes[key] = value
    for key, cfg_other in sources.configs.items():
        other = arch.names(cfg_other)
        if any(other.get(k) != sizes[k] for k in CONFIG_KEYS):
            problems.add(
                ("widen",), f"source {key} has other widths than {sources.base}; expected every source at one width"
            )
            return None
    d, m, heads, kv, hd = (sizes[k] for k in CONFIG_KEYS)
    ok = True

    def refuse(field: str, message: str) -> None:
        nonlocal ok
        ok = False
        problems.add(("widen", field), message)

    n = 1
    if w.hidden_size is not None:
        if w.hidden_size < d:
            refuse("hidden_size", f"{w.hidden_size} is smaller than the source's {d}; expected a multiple of {d}")
        elif w.hidden_size % d:
            refuse(
                "hidden_size",
                f"{w.hidden_size} is not an integer multiple of the source's {d} (only n copies of the residual "
                f"stream keep the RMS norms exact); expected {_nearest(w.hidden_size, d, d)}",
            )
        else:
            n = w.hidden_size // d
    if heads % kv:
        refuse("num_attention_heads", f"the source has {heads} heads over {kv} KV heads, not a whole group size")
        return None
    group = heads // kv
    new_heads, new_kv = w.num_attention_heads, w.num_key_value_heads
    if new_heads is None and new_kv is None:
        new_heads, new_kv = heads * n, kv * n
    elif new_heads is None:
        new_heads = new_kv * group
    for field, value, least in (("num_attention_heads", new_heads, heads), ("num_key_value_heads", new_kv, kv)):
        if value is not None and value < least:
            refuse(field, f"{value} is fewer than the source's {least}; expected at least {least}")
    if new_heads >= heads and new_heads % group:
        refuse(
            "num_attention_heads",
            f"{new_heads} heads break the GQA grouping ({heads} heads / {kv} KV heads = {group} per KV head); "
            f"expected a multiple of {group}: {_nearest(new_heads, group, heads)}",
        )
    if new_kv is None and new_heads % group == 0:
        new_kv = new_heads // group
    if new_kv is not None and new_kv >= kv and new_heads % group == 0 and new_kv * group != new_heads:
        refuse(
            "num_key_value_heads",
            f"{new_kv} KV heads with {new_heads} heads change the GQA ratio {group}; expected {new_heads // group} "
            f"(or num_attention_heads {new_kv * group})",
        )
    if ok and model_type == "llama" and (n * d) % new_heads:
        # transformers' LlamaConfig refuses to load such a config, even with head_dim explicit
        fits = [h for h in range(heads, n * d + 1, group) if (n * d) % h == 0]
        near = sorted(fits, key=lambda h: (abs(h - new_heads), h))[:2]
        refuse(
            "num_attention_heads",
            f"{new_heads} heads do not divide hidden_size {n * d}, and transformers' LlamaConfig refuses that "
            f"config; expected {' or '.join(map(str, sorted(near))) or 'a divisor of hidden_size'}",
        )
    new_m = w.intermediate_size if w.intermediate_size is not None else m * n
    if new_m < m:
        refuse("intermediate_size", f"{new_m} is smaller than the source's {m}; expected at least {m}")
    if not ok:
        return None
    seed = recipe.seed if w.seed is None else w.seed
    residual = dim_map(d, n * d, 1, "even", seed, "residual", w.noise)
    inter = dim_map(m, new_m, 1, w.init, seed, "intermediate", w.noise)
    kv_map = dim_map(kv, new_kv, hd, w.init, seed, "kv_heads", w.noise)
    q_index = [kv_map.index[j // group] * group + j % group for j in range(new_heads)]
    q_map = dim_map(heads, new_heads, hd, w.init, seed, "heads", w.noise, index=q_index)
    # k/v are read by attention, never by a Linear: no scale and no noise on a KV side
    kv_map = kv_map.model_copy(update={"scale": [1.0] * new_kv, "noise": 0.0, "noise_pairs": []})
    tied = bool(cfg.get("tie_word_embeddings"))
    embed = 1.0 / math.sqrt(n) if arch.name in EMBED_SCALED and n > 1 else None
    # the head's logits: tied, n copies of the (embedding-scaled) head sum up; the final norm takes it back
    fold = (1.0 / n if embed is None else embed) if tied and n > 1 else None
    plan = WidenPlan(
        dims={"residual": residual, "intermediate": inter, "heads": q_map, "kv_heads": kv_map},
        config={
            "hidden_size": n * d,
            "intermediate_size": new_m,
            "num_attention_heads": new_heads,
            "num_key_value_heads": new_kv,
            "head_dim": hd,
        },
        before=sizes,
        init=w.init,
        noise=w.noise,
        seed=seed,
        tied_fold=fold,
        embed_factor=embed,
        norm_offset=arch.norm_offset,
        order=ORDER,
    )
    return Widening(plan=plan, tied=tied)


def dim_map(
    before: int,
    after: int,
    unit: int,
    shares: str,
    seed: int,
    name: str,
    noise: float,
    index: Optional[list[int]] = None,
) -> DimMap:
    """Output units ``[0, before)`` are the source's; the rest copy source units (whole rounds of
    every unit, then a seeded sample without repeats). ``shares``: even, split (seeded, uneven) or zero."""
    rng = random.Random(f"tli-recipe widen {seed} {name}")
    if index is None:
        extra = after - before
        index = list(range(before)) + [i % before for i in range(extra - extra % before)]
        index += sorted(rng.sample(range(before), extra % before))
    copies: dict[int, list[int]] = {}
    for out, src in enumerate(index):
        copies.setdefault(src, []).append(out)
    scale = [1.0] * after
    pairs: list[tuple[int, int]] = []
    for group in copies.values():
        if len(group) == 1:
            continue
        if shares == "even":
            weights = [1.0 / len(group)] * len(group)
        elif shares == "split":
            draws = [rng.uniform(0.5, 1.5) for _ in group]
            weights = [x / sum(draws) for x in draws]
        else:  # zero: the copies start silent
            weights = [1.0] + [0.0] * (len(group) - 1)
        for out, weight in zip(group, weights):
            scale[out] = weight
        if noise > 0:
            pairs.append((group[0], group[1]))
    return DimMap(
        before=before, after=after, unit=unit, index=index, scale=scale, noise=noise, noise_pairs=sorted(pairs)
    )


def _axes_of(op: TensorOp, sources: Sources, tied: bool) -> Optional[list[tuple[int, str, bool]]]:
    """(axis, dimension, reads) of a tensor, growing or not; None for a tensor of unknown role."""
    arch = sources.arch
    if op.layer is not None:
        if op.projection not in LAYER_AXES:
            return None
        rows, cols = LAYER_AXES[op.projection]
        axes = [(0, rows, False)] if rows else []
        if cols and len(op.shape) == 2:
            axes.append((1, cols, True))
        return axes
    spec = arch.tensors.get(op.name)
    if spec is None:
        return None
    if spec.get("group") == "embeddings" and len(op.shape) == 2:
        return [(1, "residual", False)]  # a lookup table writes the residual stream
    if spec.get("group") == "head" and len(op.shape) == 1:
        return [(0, "residual", False)]  # the final norm gain
    if spec.get("group") == "head" and len(op.shape) == 2:
        # the head reads the final norm's output; tied, it stays the embedding's twin
        return [(1, "residual", not tied)]
    return None


def _factor(op: TensorOp, sources: Sources, w: WidenPlan) -> Optional[float]:
    """The whole-tensor factor: the tied final norm's fold; an embedding-scaled model's embedding."""
    if op.layer is not None:
        return None
    group = sources.arch.tensors.get(op.name, {}).get("group")
    if group == "head" and len(op.shape) == 1:
        return w.tied_fold
    if group == "embeddings" and len(op.shape) == 2:
        return w.embed_factor
    return None


def widen_ops(recipe: Recipe, sources: Sources, ops: list[TensorOp], wid: Widening, problems: Problems) -> list:
    """Each op whose tensor touches a growing width, rewritten to the widened shape."""
    dims = wid.plan.dims
    out: list[TensorOp] = []
    refused: dict[str, list[str]] = {}
    for op in ops:
        axes = _axes_of(op, sources, wid.tied)
        if axes is None:
            refused.setdefault("of a role the widen constructions do not know", []).append(op.name)
            out.append(op)
            continue
        growing = [(a, d, r) for a, d, r in axes if dims[d].after != dims[d].before]
        fold = _factor(op, sources, wid.plan)
        if not growing and fold is None:
            out.append(op)
            continue
        shape = list(op.shape)
        for axis, dim, _ in growing:
            if shape[axis] != dims[dim].before * dims[dim].unit:
                refused.setdefault("whose shape does not match the config's widths", []).append(op.name)
                break
            shape[axis] = dims[dim].after * dims[dim].unit
        else:
            if op.op in ("zero", "fill"):  # a constant stays that constant at any width
                out.append(op.model_copy(update={"shape": tuple(shape)}))
                continue
            if op.op != "copy":
                refused.setdefault(
                    f"made by {op.op} (widen composes with the copy, zero and zero_gain inits)", []
                ).append(op.name)
                out.append(op)
                continue
            noisy = any(r and dims[d].noise_pairs for _, d, r in growing)
            out.append(
                op.model_copy(
                    update={
                        "op": "widen",
                        "value": fold,
                        "value_offset": wid.plan.norm_offset if fold is not None and len(op.shape) == 1 else None,
                        "axes": [WidenAxis(axis=a, dim=d, reads=r) for a, d, r in growing],
                        "source_shape": tuple(op.shape),
                        "shape": tuple(shape),
                        "seed": tensor_seed(wid.plan.seed, op.name) if noisy else None,
                    }
                )
            )
            continue
        out.append(op)
    for why, names in refused.items():
        problems.add(
            ("widen",),
            f"{len(names)} tensors {why} (first: '{names[0]}'); expected the tensors of the "
            f"{sources.arch.name} definition made by copy, zero or zero_gain",
            prefer_key=True,
        )
    return out


def widen_lines(plan) -> list[str]:
    """The `plan` printout's lines for a widened plan: each width before -> after, and how."""
    w = plan.widen
    if w is None:
        return []
    changed = [f"{k} {w.before[k]} -> {v}" for k, v in w.config.items() if k != "head_dim" and w.before[k] != v]
    how = f"init {w.init}" + (f", noise {w.noise:g}" if w.noise else "") + f", seed {w.seed}"
    lines = [f"widen       {', '.join(changed) or 'no width grows'} (head_dim {w.config['head_dim']}; {how})"]
    if w.embed_factor is not None:
        lines.append(f"widen       the embedding times {w.embed_factor:g} (the model scales it by sqrt(hidden_size))")
    if w.tied_fold is not None:
        gain = "(1 + w)" if w.norm_offset == 1 else "gain"
        lines.append(f"widen       tied embeddings: the final norm's {gain} times {w.tied_fold:g} (no lm_head is made)")
    lines.append(f"widen       order: {w.order}")
    return lines


def check_widen_op(op: TensorOp, dims: Optional[dict]) -> Optional[str]:
    """What is wrong with a widen op read from plan.json (None: it is consistent with its maps)."""
    if not dims or not op.axes or op.source_shape is None or len(op.source_shape) != len(op.shape):
        return "a widen op needs the plan's widen section, its axes and its source shape"
    expected = list(op.source_shape)
    for ax in op.axes:
        m = dims.get(ax.dim)
        if m is None or ax.axis >= len(expected) or expected[ax.axis] != m.before * m.unit:
            return f"axis {ax.axis} does not match the {ax.dim} map"
        expected[ax.axis] = m.after * m.unit
    if tuple(expected) != tuple(op.shape):
        return f"its maps give shape {expected}, the plan says {list(op.shape)}"
    if any(ax.reads and dims[ax.dim].noise_pairs and dims[ax.dim].noise > 0 for ax in op.axes) and op.seed is None:
        return "its noise has no seed"
    return None
