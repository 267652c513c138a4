"""execute_plan(plan) -> output directory: apply a Plan tensor by tensor.

Each output tensor is read (one at a time, plain file reads), transformed on the
chosen device, cast, and streamed into a shard whose header was written first.
Everything is written into a temporary directory beside the target, which is
renamed into place only when complete: a failure or Ctrl-C leaves no partial output.
Sources are opened read-only and never modified."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from tli_recipe._version import __version__
from tli_recipe.errors import TliError
from tli_recipe.execute.output import check_output, staged_output
from tli_recipe.execute.shards import (
    ShardWriter,
    TensorReader,
    check_written,
    layout_shards,
    torch_dtype,
)
from tli_recipe.plan.model import Plan, TensorOp
from tli_recipe.plan.ops import OPS, needs_torch
from tli_recipe.plan.widen import check_widen_op
from tli_recipe.source.checkpoint import SIDE_FILES, CheckpointError, open_checkpoint
from tli_recipe.source.checksums import check_digests, pinned_files, side_file
from tli_recipe.source.checksums import metadata as provenance_metadata
from tli_recipe.source.hashes import SourceHasher


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TliError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise TliError(f"--device {device}: unknown device; expected auto, cpu or cuda[:N]")
    return device


def make_tensor(
    op: TensorOp,
    reader: TensorReader,
    source,
    device: str,
    sources: Optional[dict] = None,
    precomputed: Optional[dict] = None,
    out=None,
    dims: Optional[dict] = None,
):
    """The output tensor of one TensorOp (on the CPU, in the output dtype); with ``out`` (a CPU tensor
    of the op's dtype and shape), the values are stored there and ``out`` is returned.

    Random streams are drawn on the CPU from a per-tensor seed, so cpu and cuda runs
    give the same values; only the arithmetic runs on ``device``.
    """
    plain_copy = out is not None and op.op == "copy"
    tensor = _compute(op, reader, source, device, sources, precomputed, cast=not plain_copy, dims=dims)
    if out is None:
        return tensor
    # copy_ would broadcast a wrong shape and cast a wrong dtype: refuse them as the writer does
    if tuple(tensor.shape) != tuple(out.shape) or (tensor.dtype != out.dtype and not plain_copy):
        raise TliError(
            f"tensor '{op.name}': got shape {tuple(tensor.shape)} {tensor.dtype}, the plan says "
            f"{tuple(op.shape)} {op.dtype}"
        )
    return out.copy_(tensor)  # a plain copy's source is cast here, on the CPU


def _compute(
    op: TensorOp,
    reader: TensorReader,
    source,
    device: str,
    sources: Optional[dict],
    precomputed: Optional[dict],
    cast: bool = True,
    dims: Optional[dict] = None,
):
    import torch

    out_dtype = torch_dtype(op.dtype)
    if op.op == "zero":
        return torch.zeros(op.shape, dtype=out_dtype)
    if op.op == "fill":
        return torch.full(op.shape, op.value, dtype=out_dtype)
    if op.op in ("lesa", "hidden"):
        if not precomputed or op.name not in precomputed:
            raise TliError(f"tensor '{op.name}': its {op.op} values were not computed before writing")
        return precomputed[op.name].to(out_dtype)
    if op.op == "random":
        gen = torch.Generator().manual_seed(op.seed)
        return (torch.randn(op.shape, generator=gen, dtype=torch.float32) * op.value).to(out_dtype)
    info = source.tensors.get(op.source_name)
    if info is None:
        raise CheckpointError(
            f"{source.path}: tensor '{op.source_name}' is in the plan but not in the checkpoint; "
            "the checkpoint changed since the plan was made, plan again"
        )
    tensor = reader.read(info)
    if op.op == "copy":
        return tensor.to(out_dtype) if cast else tensor
    work = tensor.to(device=device, dtype=torch.float32)
    if op.op == "scale":
        work = work * op.value
    elif op.op == "noise":
        gen = torch.Generator().manual_seed(op.seed)
        work = work + (torch.randn(op.shape, generator=gen, dtype=torch.float32) * op.value).to(device)
    elif op.op == "interpolate":
        other = (sources or {}).get(op.second_source, source).tensors.get(op.second_name)
        if other is None:
            raise CheckpointError(
                f"{source.path}: tensor '{op.second_name}' is in the plan but not in the checkpoint; "
                "the checkpoint changed since the plan was made, plan again"
            )
        nxt = reader.read(other, slot=1).to(device=device, dtype=torch.float32)
        work = (1 - op.value) * work + op.value * nxt
    elif op.op == "widen":
        work = _widen(op, work, dims)
    else:  # pragma: no cover - the plan's Literal admits nothing else
        raise TliError(f"unknown operation {op.op!r} for tensor '{op.name}'")
    return work.to(out_dtype).cpu()


def _widen(op: TensorOp, work, dims: Optional[dict]):
    """Gather ``work`` along each widened axis through its dimension map; on a reading side, scale each
    unit by its share and add the exact noise (+N on one copy, -N on its twin)."""
    import torch

    if not dims:
        raise TliError(f"tensor '{op.name}': a widen op, and the plan has no widen section; plan again")
    device = work.device
    for ax in op.axes or ():
        m = dims[ax.dim]
        unit = torch.arange(m.unit, device=device)
        index = (torch.tensor(m.index, device=device)[:, None] * m.unit + unit).reshape(-1)
        work = work.index_select(ax.axis, index)
        if not ax.reads:
            continue
        shape = [1] * work.dim()
        shape[ax.axis] = -1
        scale = torch.tensor(m.scale, dtype=torch.float32, device=device).repeat_interleave(m.unit)
        work = work * scale.reshape(shape)
        if m.noise > 0 and m.noise_pairs:
            moved = work.movedim(ax.axis, -1)
            draw_shape = (*moved.shape[:-1], len(m.noise_pairs) * m.unit)
            gen = torch.Generator().manual_seed(op.seed)
            draw = (torch.randn(draw_shape, generator=gen, dtype=torch.float32) * m.noise).to(device)
            first = torch.tensor([a for a, _ in m.noise_pairs], device=device)[:, None] * m.unit + unit
            second = torch.tensor([b for _, b in m.noise_pairs], device=device)[:, None] * m.unit + unit
            moved = moved.clone()
            moved[..., first.reshape(-1)] += draw
            moved[..., second.reshape(-1)] -= draw
            work = moved.movedim(-1, ax.axis)
    if op.value is not None:
        offset = op.value_offset or 0.0
        work = (work + offset) * op.value - offset
    return work


def _lesa(plan: Plan, sources: dict, device: str, log) -> dict:
    """Predict every ``lesa`` tensor up front (it needs all layers of a projection type at once)."""
    if not any(op.op == "lesa" for op in plan.tensors):
        return {}
    from tli_recipe.execute.lesa import lesa_tensors

    if plan.lesa is None:
        raise TliError("plan.json has lesa tensors but no lesa settings; plan again with this tli-recipe version")
    result = lesa_tensors(plan, sources, device, log)
    log(f"lesa: {len(result.tensors)} tensors predicted in {sum(result.seconds.values()):.1f} s on {device}")
    return result.tensors


def _check_sources(plan: Plan) -> dict:
    """Open every source checkpoint and check it still matches the plan (names, shapes, dtypes)."""
    opened = {}
    for key, src in plan.sources.items():
        if not src.has_weights:
            raise TliError(
                f"{src.path}: holds only config.json, no safetensors weights; download the weights before `run`"
            )
        opened[key] = open_checkpoint(Path(src.path))
    mismatched = []
    dims = plan.widen.dims if plan.widen is not None else None
    for op in plan.tensors:
        wrong = check_widen_op(op, dims) if op.op == "widen" else None
        if wrong:
            raise TliError(f"plan.json: tensor '{op.name}': {wrong}; plan again")
        if not OPS[op.op].reads_source:
            continue
        info = opened[op.source].tensors.get(op.source_name)
        if info is None or info.shape != tuple(op.source_shape or op.shape) or info.dtype != op.source_dtype:
            mismatched.append(op.source_name)
    if mismatched:
        raise TliError(
            f"{len(mismatched)} of {len(plan.tensors)} planned source tensors are missing or differ in "
            f"shape/dtype (first: '{mismatched[0]}'); the checkpoint changed since the plan was made, plan again"
        )
    return opened


#: Writes more files into the output before it becomes visible: (plan, temporary folder, final folder).
SideWriter = Callable[[Plan, Path, Path], None]


def execute_plan(
    plan: Plan,
    output: Optional[str | Path] = None,
    *,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    sync: bool = False,
    log=print,
    side_writers: Sequence[SideWriter] = (),
    rehash: bool = False,
) -> Path:
    """Write the output checkpoint of ``plan``; returns its directory.

    Unchanged copies and zeros are written as bytes (``copy_file_range``), without torch;
    torch is imported only when some tensor needs arithmetic or a dtype cast. With
    ``sync`` every file is flushed to disk before the final rename. Each of ``side_writers``
    adds files (the public API adds the training configs) inside the same all-or-nothing swap.
    Source digests come from hub blob names or the digest cache, else are hashed while the
    output is written (``rehash``: hash every byte); pins are checked before the output appears.
    """
    if plan.blocking:
        raise TliError("the plan needs choices the recipe does not state:\n  " + "\n  ".join(plan.blocking))
    target = Path(output or plan.output)
    if str(target) != plan.output:  # plan.json and the model card name where the output really is
        plan = plan.model_copy(update={"output": str(target)})
    computed = [op for op in plan.tensors if needs_torch(op)]
    device = pick_device(device) if computed else "none (byte copies)"
    sources = _check_sources(plan)
    check_output(target, plan, sources, force)
    files = pinned_files(plan, sources)  # a pinned file that is missing stops the run before any byte is written
    hasher = SourceHasher([p for names in files.values() for p in names.values()], trust_cache=not rehash).start()
    try:
        precomputed = _lesa(plan, sources, device, log)
        if any(op.op == "hidden" for op in plan.tensors):  # the hidden router init runs the source models
            from tli_recipe.execute.hidden_router import hidden_routers

            precomputed.update(hidden_routers(plan, device, log))
        # The headers reserve room for the digests (64 hex characters each) and get them once known.
        reserved = plan.model_copy(
            update={"source_files": {k: dict.fromkeys(names, "0" * 64) for k, names in files.items()}}
        )
        shards = layout_shards(((op.name, op.dtype, tuple(op.shape)) for op in plan.tensors), plan.shard_size)
        started = time.perf_counter()
        # Locked, written beside the target, swapped in when the block ends; removed on any failure.
        with staged_output(target, force=force, recipe_sha256=plan.recipe_sha256, sync=sync, log=log) as tmp:
            writer = ShardWriter(tmp, shards, _shard_metadata(reserved), sync=sync)
            try:
                _write_tensors(plan, writer, sources, device, precomputed, progress)
                plan = plan.model_copy(update={"source_files": check_digests(plan, files, hasher.result())})
                writer.close(_shard_metadata(plan))
                check_written(tmp, shards)  # a shard safetensors would refuse never becomes the output
                _write_side_files(plan, tmp, Path(plan.sources[plan.base_model].path))
                for side_writer in side_writers:
                    side_writer(plan, tmp, target)
            except BaseException:
                writer.abort()
                raise
    finally:
        hasher.stop()
    log(
        f"wrote {target} ({len(shards)} shard{'s' * (len(shards) > 1)}, {plan.totals.bytes_to_write / 2**20:.1f} MiB, "
        f"{plan.totals.layers_before} -> {plan.totals.layers_after} layers) in {time.perf_counter() - started:.1f} s; "
        f"{len(computed)} of {len(plan.tensors)} tensors computed (device: {device}), the rest byte copies or zeros; "
        f"hashed {hasher.hashed_files} of {len(hasher.files)} source files ({hasher.hashed / 2**20:.1f} MiB; the rest "
        "known from hub blob names or the digest cache)"
    )
    return target


def _shard_metadata(plan: Plan) -> dict[str, str]:
    return {
        "format": "pt",
        "tli_recipe_version": __version__,
        "recipe_sha256": plan.recipe_sha256,
        "recipe_name": plan.name,
        **provenance_metadata(plan),
    }


def _write_tensors(plan: Plan, writer: ShardWriter, sources, device: str, precomputed, progress: bool) -> None:
    """Every planned tensor, in order: zeros as holes, unchanged copies as bytes, the rest computed."""
    from tqdm import tqdm

    reader = TensorReader(reuse=True)  # each tensor read is consumed (copied into the writer's buffer) at once
    try:
        bar = tqdm(
            total=plan.totals.bytes_to_write,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"writing {plan.name}",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for i, op in enumerate(plan.tensors, 1):
                if op.op == "zero":
                    written = writer.zeros(op.name)
                elif not needs_torch(op):
                    written = writer.copy(op.name, sources[op.source].tensors[op.source_name])
                else:
                    written = writer.write(
                        op.name,
                        make_tensor(
                            op,
                            reader,
                            sources[op.source],
                            device,
                            sources,
                            precomputed,
                            out=writer.buffer(op.dtype, tuple(op.shape)),
                            dims=plan.widen.dims if plan.widen is not None else None,
                        ),
                    )
                bar.update(written)
                bar.set_postfix_str(f"{i}/{len(plan.tensors)} tensors", refresh=False)
    finally:
        reader.close()


def _write_side_files(plan: Plan, folder: Path, base: Path) -> None:
    from tli_recipe.execute.card import model_card

    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    for name in SIDE_FILES:
        if side_file(base, name):
            shutil.copyfile(base / name, folder / name)
    header = (
        f"# Resolved recipe of {plan.name} (after --set overrides and defaults), written by tli-recipe {__version__}.\n"
        f"# recipe_sha256: {plan.recipe_sha256}\n"
    )
    (folder / "recipe.yaml").write_text(header + yaml.safe_dump(plan.recipe, sort_keys=False))
    (folder / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
    (folder / "README.md").write_text(model_card(plan))
