"""Human-readable views of a Plan: the `plan` table, counts and ranges, the architecture table."""

from __future__ import annotations

from tli_recipe.plan.cost import (
    PARTS,
    VERIFY_BATCH,
    VERIFY_DTYPE,
    VERIFY_LENGTH,
    human_seconds,
    lesa_cost,
    stage_memory,
    verify_peak,
)
from tli_recipe.plan.model import Plan, TensorOp
from tli_recipe.plan.ops import OPS
from tli_recipe.plan.stages import ops_by_layer
from tli_recipe.plan.widen import widen_lines
from tli_recipe.recipe.schema import projection_order

#: How `plan` shows a stage's precision.
PRECISIONS = {"auto": "auto (bfloat16 on a GPU with bfloat16, float32 on CPU)"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


#: Lists longer than this are summarised (first entries, ..., last, and the count) wherever a plan is shown.
LIST_LIMIT = 12


def summarize(values) -> str:
    """A list as the plan printout, the card and diff show it: whole up to LIST_LIMIT entries, else its first
    three, ``...``, its last, and the count (with the step when evenly spaced): ``[4, 9, 14, ..., 479] (96
    entries, every 5th)``."""
    values = list(values)
    if len(values) <= LIST_LIMIT:
        return "[" + ", ".join(map(str, values)) + "]"
    steps = {b - a for a, b in zip(values, values[1:])} if all(type(v) is int for v in values) else set()
    step = f", every {next(iter(steps))}{_ordinal(next(iter(steps)))}" if len(steps) == 1 else ""
    head = ", ".join(map(str, values[:3]))
    return f"[{head}, ..., {values[-1]}] ({len(values)} entries{step})"


def _ordinal(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def is_hub_source(src) -> bool:
    """Whether a plan's source model came from the hub (its ``ref`` an ``org/name`` id that resolved into a
    cache), not from a local directory (whose resolved ``path`` ends with what the recipe wrote)."""
    from tli_recipe.source.hub import parse_hub_id

    return parse_hub_id(src.ref) is not None and not src.path.endswith("/" + src.ref.rstrip("/"))


def shown_source(plan: Plan, key: str) -> str:
    """A source model as every view prints it: its hub id, or its local directory as an absolute path."""
    src = plan.sources.get(key)
    if src is None:
        return key
    return src.ref if is_hub_source(src) else src.path


def shown_path(path: str) -> str:
    """A local path printed one way: absolute (a relative one is relative to the working directory)."""
    from pathlib import Path

    return str(Path(path).expanduser().absolute())


def _shown(op: TensorOp) -> str:
    return f"{op.op}({op.value:g})" if OPS[op.op].value is not None and op.value is not None else op.op


def describe_ops(ops: list[TensorOp]) -> str:
    """The policy column of one output layer: each projection not copied, by its op and value; the
    experts of an upcycled layer as their count and each expert's ops (``experts=4 (copy)``). A
    projection whose experts differ is left to the experts' part."""
    by_proj: dict[str, set[str]] = {}
    experts: dict[int, set[str]] = {}
    for op in ops:
        by_proj.setdefault(op.projection or op.name, set()).add(_shown(op))
        if op.expert is not None:
            experts.setdefault(op.expert, set()).add(_shown(op))
    shown = {
        p: next(iter(v))
        for p, v in sorted(by_proj.items(), key=lambda i: projection_order(i[0]))
        if len(v) == 1 and v != {"copy"}
    }
    text = ", ".join(f"{p}={v}" for p, v in shown.items()) + ", rest copy" if shown else "copy"
    if experts:
        kinds = ["+".join(sorted(experts[e])) for e in sorted(experts)]
        kinds_shown = kinds[0] if len(set(kinds)) == 1 else ", ".join(kinds)
        text = f"experts={len(experts)} ({kinds_shown}), " + text
    return text


def layer_policy(plan: Plan, output: int) -> str:
    return describe_ops([op for op in plan.tensors if op.layer == output])


def plan_table(plan: Plan, world_size: int | None = None) -> str:
    """The layer map and totals, as `tli-recipe plan` prints them; ``world_size``: the GPUs the memory estimates
    divide sharded parts over (None: per GPU of one, naming the sharded parts)."""
    multi = len(plan.sources) > 1
    slices = _slices(plan)
    rows = [("out", "source", "role", "slice", "policy")]
    by_layer = ops_by_layer(plan.tensors)  # one pass: the table stays linear in the plan's size
    with_next = {op.layer for op in plan.tensors if op.second_name}
    for e in plan.layers:
        src = f"{e.source}:{e.layer}" if multi else f"{e.layer}"
        if e.output in with_next:
            src += f"+{e.next_layer}"
        rows.append(
            (
                str(e.output),
                src,
                e.role + ("*" if e.role == "injected" else ""),
                str(e.slice) if e.slice is not None else "",
                describe_ops(by_layer.get(e.output, [])),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    up = plan.upcycle
    arch = f"{plan.architecture} -> {up.output_architecture} (upcycled)" if up else plan.architecture
    lines = [f"plan {plan.name}: {arch} from {shown_source(plan, plan.base_model)}"]
    for r in rows:
        cells = [f"{r[0]:>{widths[0]}}", f"{r[1]:>{widths[1]}}", f"{r[2]:<{widths[2]}}"]
        if slices:
            cells.append(f"{r[3]:>{widths[3]}}")
        lines.append(("  " + "  ".join(cells) + "  " + r[4]).rstrip())
    t = plan.totals
    preserving = (
        "yes: the output computes exactly the base model"
        if plan.function_preserving
        else "no: the output differs from the base model until trained"
    )
    injected = plan.requires_grad_layers
    lines += [
        "",
        f"layers      {t.layers_before} -> {t.layers_after}"
        + (f" ({len(injected)} injected: {summarize(injected)})" if injected else ""),
        f"parameters  {human_count(t.parameters_before)} -> {human_count(t.parameters_after)} "
        f"({t.parameters_before:,} -> {t.parameters_after:,})",
        f"write       {t.tensors} tensors, {human_bytes(t.bytes_to_write)} as {plan.dtype}, shards of at most "
        f"{human_bytes(plan.shard_size)}",
        f"preserving  {preserving}",
        f"output      {shown_path(plan.output)}",
    ]
    for index, text in slices:
        lines.append(f"slice {index:<5} {text}")
    if up is not None:
        lines += upcycle_lines(plan)
    lines += widen_lines(plan)
    if plan.init:
        recommended = plan.init == plan.init_recommended
        lines.append(
            f"init        {', '.join(f'{k}={v}' for k, v in plan.init.items())}; other tensors copied"
            + (f" (recommended for {plan.architecture})" if recommended else "")
        )
        if not recommended and plan.init_recommended:
            lines.append(
                f"            recommended for {plan.architecture}: "
                f"{', '.join(f'{k}={v}' for k, v in plan.init_recommended.items())}"
            )
        options = "; ".join(f"{b}: {' | '.join(o)}" for b, o in plan.identity_options.items())
        if options:
            lines.append(f"            exact when each branch has one of: {options}")
    for c in plan.config_changes:
        after = summarize(c.after) if isinstance(c.after, list) else c.after
        before = summarize(c.before) if isinstance(c.before, list) else c.before
        lines.append(f"config      {c.key}: {before} -> {after} ({c.why})")
    for s in plan.stages:
        what = f"LoRA r={s.lora.r} on {', '.join(s.lora.targets)}" if s.lora else "full weights"
        groups = f" + {', '.join(s.trainable_groups)}" if s.trainable_groups else ""
        lines.append(
            f"stage       {s.name}: {len(s.trainable_layers)} layers{groups}, {what}, "
            f"{human_count(s.trainable_parameters)} trainable parameters"
            + (f" (adapters on {len(s.parameters)} weights)" if s.lora else "")
            + f", precision {PRECISIONS.get(s.settings.precision, s.settings.precision)}"
            + (
                f"; objective mod: ensemble of layers {ranges(s.mod.layers)} ({human_count(s.mod.head_parameters)} "
                f"head parameters, init {s.mod.init})"
                if s.mod
                else ""
            )
        )
    cost = lesa_cost(plan)
    if cost is not None:
        lines.append(
            f"lesa        {cost.groups} projection types fitted before writing (SVD of up to "
            f"{cost.largest[0]} x {cost.largest[1]}, {cost.flops / 1e12:.1f} TFLOP, ~{human_bytes(cost.peak_bytes)} "
            f"in memory): about {human_seconds(cost.cpu_seconds)} on a 2-core CPU, less with more cores or "
            "--device cuda (estimate)"
        )
    lines += memory_lines(plan, world_size)
    for w in plan.warnings:
        lines.append(f"warning     {w}")
    for b in plan.blocking:
        lines.append(f"blocking    {b}")
    return "\n".join(lines)


_PART_NAMES = {"weights": "weights", "gradients": "gradients", "optimizer": "Adam state"}


def memory_lines(plan: Plan, world_size: int | None = None) -> list[str]:
    """Memory per device of each training stage and verify's peak (plan/cost.py), before any long work."""
    lines = []
    gpus = f"per GPU of {world_size}" if world_size else "per GPU"
    if plan.stages:
        lines += [
            f"memory      train, {gpus}, from the parameter counts: weights, gradients and Adam state of the trainable",
            "            part; activations are not counted (they grow with batch x sequence length)",
        ]
    for s in plan.stages:
        m = stage_memory(plan, s, world_size)
        parts = " + ".join(f"{human_bytes(m.per_device(p))} {_PART_NAMES[p]}" for p in PARTS if p not in m.offloaded)
        lines.append(
            f"            stage {s.name} ({m.setup}, {m.trainable_bytes} B per trainable parameter): {parts} = "
            f"{human_bytes(m.total)}" + ("" if m.world_size_given or not m.sharded else " on 1 GPU")
        )
        shared = [_PART_NAMES[p] for p in m.sharded if p not in m.offloaded]
        if shared and not m.world_size_given:
            lines.append(f"              sharded: divide {', '.join(shared)} by the number of GPUs (or pass --gpus N)")
        if m.offloaded:
            cpu = sum(m.whole[p] for p in m.offloaded)
            lines.append(
                f"              in CPU memory instead: {', '.join(_PART_NAMES[p] for p in m.offloaded)} "
                f"({human_bytes(cpu)} over all processes)"
            )
        lines += [f"              {note}" for note in m.notes]
    if plan.tensors:
        peak = verify_peak(plan, batch=VERIFY_BATCH, length=VERIFY_LENGTH, dtype=VERIFY_DTYPE)
        lines += [
            f"memory      verify: ~{human_bytes(peak.total)} at its peak above the interpreter "
            f"(streamed, {VERIFY_DTYPE}, {VERIFY_BATCH} x {VERIFY_LENGTH} tokens):",
            f"            the largest unit of weights ({peak.largest_unit}) {human_bytes(peak.weights)} + activations "
            f"{human_bytes(peak.activations)}",
        ]
    return lines


def _slices(plan: Plan) -> list[tuple[int, str]]:
    """``(index, 'layers [8, 32) of SOURCE -> output 24-47')`` for each recipe slice; none for a plain stack."""
    given = plan.recipe.get("slices") or []
    if not given:
        return []
    out = []
    for index, item in enumerate(given):
        start, end = item.get("layer_range", [None, None])
        outputs = [e.output for e in plan.layers if e.slice == index]
        source = item.get("source") or item.get("model")
        where = f" of {source}" if isinstance(source, str) and source else ""
        out.append((index, f"layers [{start}, {end}){where} -> output {ranges(outputs)}"))
    return out


def upcycle_lines(plan: Plan) -> list[str]:
    """The expert map of an upcycled plan: layers, each expert's source and init, counts, the verdict."""
    up = plan.upcycle
    dense = f"; dense: {ranges(up.dense_layers)}" if up.dense_layers else ""
    lines = [
        f"upcycle     {plan.architecture} -> {up.output_architecture}: {up.experts} experts, top-{up.top_k}, "
        f"router {up.router}; output layers {ranges(up.layers)}{dense}",
        f"            order: {up.order}",
    ]
    for e, (source, init) in enumerate(zip(up.expert_sources, up.expert_init)):
        lines.append(f"expert {e:<4} {init} of the dense MLP of " + (source if source else "each layer's own source"))
    lines.append(
        f"moe params  total {human_count(up.parameters_total)}, active per token {human_count(up.parameters_active)} "
        f"({up.parameters_total:,} / {up.parameters_active:,}; {up.top_k} of {up.experts} experts per token, "
        "embeddings included)"
    )
    # Zero router: every kept weight is 1/k; w*a + w*a is exactly a for k = 2 (and k = 1), while longer sums may round.
    bits = up.router == "zero" and up.top_k <= 2
    exact = (
        f"identical experts and renormalised top-k weights give the dense MLP, "
        f"{'bit for bit (zero router, k <= 2)' if bits else 'up to float rounding'}"
        if not up.breaks_preservation
        else "; ".join(up.breaks_preservation)
    )
    lines.append(f"moe exact   {'yes' if not up.breaks_preservation else 'no'}: {exact}")
    lines.append(
        "router loss "
        + ", ".join(f"{k}={v}" for k, v in up.aux_loss.items())
        + " (output config; set them with output_config)"
    )
    return lines


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ", ".join(out) or "none"


def architecture_table() -> str:
    """The README's table of supported architectures, generated from the definitions."""
    from tli_recipe.source.arch import load_architectures

    rows = [
        "| definition | `architectures` | layer prefix | recommended init of an injected layer |",
        "|---|---|---|---|",
    ]
    for name, arch in sorted(load_architectures().items()):
        init = ", ".join(f"{p}={k}" for p, k in arch.recommended_init.items())
        prefixes = " or ".join(f"`{p}`" for p in arch.layer_prefixes)
        rows.append(f"| {name} | {', '.join(arch.architectures)} | {prefixes} | {init} |")
    return "\n".join(rows)
