"""verify_output(dir): check a written checkpoint against its plan and its base model.

Two checks: every tensor is what the plan says (present, shape, dtype, and its exact
values: the plan is deterministic, so each tensor is recomputed and compared bit for bit,
with a reference of its own for each op and a second tensor reader, so an executor bug
cannot hide behind shared code; a source tensor holding NaN or inf is named), and the function
check of ``layerwise.py``: base and output run with real ``transformers`` on the same tokens,
one decoder layer at a time (or whole, ``whole=True``), compared layer by layer and at the
logits; a function-preserving plan must agree within the tolerance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tli_recipe.errors import TliError, VerifyError
from tli_recipe.execute.layerwise import FunctionCheck, all_finite
from tli_recipe.plan.model import Plan
from tli_recipe.plan.widen import check_widen_op
from tli_recipe.source.checkpoint import open_checkpoint


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    not_recomputed: int = 0
    tensor_problems: list[str] = field(default_factory=list)
    max_abs_diff: Optional[float] = None
    function_preserving: bool = True
    atol: float = 1e-5
    tokens: int = 0
    function: Optional[FunctionCheck] = None  # the layer-by-layer comparison
    nonfinite_sources: list[str] = field(default_factory=list)  # source tensors holding NaN or inf

    @property
    def tolerance(self) -> float:
        """What the logits of a function-preserving plan must meet: atol x max(1, max |base logits|)."""
        return self.function.logits_tolerance if self.function is not None else self.atol

    @property
    def ok(self) -> bool:
        logits_ok = self.max_abs_diff is None or not self.function_preserving or self.max_abs_diff <= self.tolerance
        nonfinite = self.nonfinite_sources or (self.function is not None and self.function.nonfinite)
        return not self.tensor_problems and logits_ok and not nonfinite


def load_plan(folder: Path) -> Plan:
    path = folder / "plan.json"
    try:
        return Plan.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise TliError(f"{path}: not found; verify works on a directory written by `tli-recipe run`") from None
    except ValueError as exc:
        raise TliError(f"{path}: not a plan of this tli-recipe version ({plan_problems(exc)})") from None


def plan_problems(exc: ValueError, limit: int = 3) -> str:
    """The first problems of a plan.json that did not validate: field path and rule, never the value
    (an edited plan.json is hostile input; its text is not echoed)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc).splitlines()[0][:200]
    errors = exc.errors(include_input=False, include_url=False)
    shown = [f"{'.'.join(str(p)[:60] for p in e['loc']) or '(root)'}: {e['msg'][:200]}" for e in errors[:limit]]
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return "; ".join(shown) + more


class _Files:
    """Reads tensors through ``safetensors.safe_open``: a second reader, independent of the
    executor's ``TensorReader``, so a bug in one is caught by the other.

    safe_open maps the whole file, and every page read stays in the process's resident set
    while the map is open: on the 1.1B benchmark model, keeping the maps open put the tensor
    check at 5.1 GB RSS. The maps are closed after every ``budget`` bytes read (reopening
    costs one header parse)."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self._open: dict[str, object] = {}
        self._budget = budget
        self._read = 0

    def get(self, info):
        from safetensors import safe_open

        if self._read >= self._budget:
            self.close()
        handle = self._open.get(info.file)
        if handle is None:
            handle = self._open[info.file] = safe_open(info.file, framework="pt")
        self._read += info.nbytes
        return handle.get_tensor(info.name)

    def close(self) -> None:
        self._open.clear()
        self._read = 0


def _same_bits(a, b) -> bool:
    """Bitwise equality: NaN equals the same NaN, and -0.0 is not +0.0."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _expected_widen(op, this, dims):
    """widen, from the op's definition: element by element index and scale lists, applied to the
    axis moved last; the noise draw (shape: the other axes, then pairs x unit) added to each pair's
    first unit and subtracted from its second."""
    import torch

    wrong = check_widen_op(op, dims)
    if wrong:
        raise TliError(f"plan.json: tensor '{op.name}': {wrong}")
    for ax in op.axes or ():
        m = dims[ax.dim]
        elements = [src * m.unit + k for src in m.index for k in range(m.unit)]
        last = this.movedim(ax.axis, -1)[..., elements]
        if ax.reads:
            last = last * torch.tensor([s for s in m.scale for _ in range(m.unit)], dtype=torch.float32)
            if m.noise > 0 and m.noise_pairs:
                gen = torch.Generator().manual_seed(op.seed)
                width = len(m.noise_pairs) * m.unit
                draw = torch.randn((*last.shape[:-1], width), generator=gen, dtype=torch.float32) * m.noise
                for p, (a, b) in enumerate(m.noise_pairs):
                    block = draw[..., p * m.unit : (p + 1) * m.unit]
                    last[..., a * m.unit : (a + 1) * m.unit] += block
                    last[..., b * m.unit : (b + 1) * m.unit] -= block
        this = last.movedim(-1, ax.axis)
    if op.value is None:
        return this
    offset = op.value_offset or 0.0  # a gain stored as w in offset + w
    return (offset + this) * op.value - offset


def expected_tensor(op, read_source, dims=None):
    """What the plan says ``op`` holds, computed from the op's definition alone (not by the executor's
    code): ``read_source(source_key, tensor_name)`` gives a source tensor. None for ``lesa``, whose
    values come from a trained predictor, and ``hidden`` routers, which come from running the source
    model: both are checked for finiteness only."""
    import torch

    from tli_recipe.execute.shards import torch_dtype

    dtype = torch_dtype(op.dtype)
    if op.op in ("lesa", "hidden"):
        return None
    if op.op == "zero":
        return torch.zeros(op.shape, dtype=dtype)
    if op.op == "fill":
        return torch.full(op.shape, float(op.value), dtype=dtype)
    if op.op == "random":
        draw = torch.randn(op.shape, generator=torch.Generator().manual_seed(op.seed), dtype=torch.float32)
        return (draw * op.value).to(dtype)
    this = read_source(op.source, op.source_name)
    if op.op == "copy":
        return this.to(dtype)
    this = this.to(torch.float32)
    if op.op == "scale":
        return (this * op.value).to(dtype)
    if op.op == "noise":
        draw = torch.randn(op.shape, generator=torch.Generator().manual_seed(op.seed), dtype=torch.float32)
        return (this + draw * op.value).to(dtype)
    if op.op == "interpolate":
        nxt = read_source(op.second_source, op.second_name).to(torch.float32)
        return ((1 - op.value) * this + op.value * nxt).to(dtype)
    if op.op == "widen":
        return _expected_widen(op, this, dims).to(dtype)
    raise TliError(
        f"plan.json: tensor '{op.name}': operation {op.op!r} is not one this tli-recipe version knows; "
        "plan again with this version"
    )


def check_tensors(plan: Plan, folder: Path, report: VerifyReport) -> None:
    """Recompute every planned tensor from its op's definition and compare it with the file, bit for bit."""
    import torch

    output = open_checkpoint(folder)
    if output.config != plan.config:
        keys = sorted(k for k in set(output.config) | set(plan.config) if output.config.get(k) != plan.config.get(k))
        report.tensor_problems.append(f"config.json differs from the plan's config in: {', '.join(keys)}")
    sources = {key: open_checkpoint(Path(src.path)) for key, src in plan.sources.items()}
    planned = {op.name for op in plan.tensors}
    extra = sorted(set(output.tensors) - planned)
    if extra:
        report.tensor_problems.append(f"{len(extra)} tensors not in the plan (first: '{extra[0]}')")
    files = _Files()

    def read_source(key: str, name: str):
        info = sources[key].tensors.get(name) if key in sources else None
        if info is None:
            raise TliError(
                f"{plan.sources[key].path if key in plan.sources else key}: tensor '{name}' is in the plan "
                "but not in the source checkpoint; the source changed since the run"
            )
        tensor = files.get(info)
        if (key, name) not in seen:
            seen.add((key, name))
            if tensor.is_floating_point() and not all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                report.nonfinite_sources.append(f"{key}: '{name}' in {info.file} ({bad} of {tensor.numel()} values)")
        return tensor

    seen: set[tuple[str, str]] = set()
    for op in plan.tensors:
        info = output.tensors.get(op.name)
        if info is None:
            report.tensor_problems.append(f"'{op.name}': missing from the output")
            continue
        if info.shape != tuple(op.shape) or info.dtype != op.dtype:
            report.tensor_problems.append(
                f"'{op.name}': {list(info.shape)} {info.dtype}, the plan says {list(op.shape)} {op.dtype}"
            )
            continue
        got = files.get(info)
        want = expected_tensor(op, read_source, plan.widen.dims if plan.widen is not None else None)
        if want is None:  # lesa, hidden
            ok = bool(torch.isfinite(got.float()).all())
            report.not_recomputed += 1
        else:
            ok = _same_bits(got, want)
        if not ok:
            report.tensor_problems.append(f"'{op.name}': values differ from the plan's {op.op} of '{op.source_name}'")
        report.tensors_checked += 1


def _trained_from(folder: Path) -> str:
    """`` (PATH)``: the grown checkpoint a trained stage folder names in training_metrics.json, or ''."""
    try:
        source = json.loads((folder / "training_metrics.json").read_text()).get("input")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" ({source}: `tli-recipe verify {source}`)" if isinstance(source, str) else ""


def verify_output(
    folder: str | Path,
    *,
    atol: float = 1e-5,
    tensors: bool = True,
    logits: bool = True,
    device: str = "cpu",
    whole: bool = False,
    dtype: str = "float32",
    text: Optional[Path] = None,
    batch: int = 2,
    length: int = 24,
    log=lambda msg: None,
) -> VerifyReport:
    """Check an output folder: its tensors against the plan (``tensors``), and its function against the
    base model (``logits``: layer-streamed, or ``whole`` models; ``dtype`` float32, bfloat16, float16 or
    stored; ``text``: a text file tokenised by the base's tokenizer instead of random ids)."""
    from tli_recipe.execute.layerwise import check_function

    folder = Path(folder)
    if not tensors and not logits:
        raise TliError("nothing to verify: --no-tensors and --no-logits together skip every check")
    if (folder / "training_metrics.json").is_file() or (folder / "training_config.yaml").is_file():
        grown = _trained_from(folder)
        raise TliError(
            f"{folder}: the output of a training stage (tli-recipe train), not of `run`: verify checks what "
            "`run` wrote against its plan.json, and training changes the weights (and config.json, e.g. "
            f"use_cache) by design. Verify the checkpoint the stages started from{grown}; compare losses "
            "with `tli-recipe eval`"
        )
    plan = load_plan(folder)
    report = VerifyReport(function_preserving=plan.function_preserving, atol=atol)
    if tensors:
        check_tensors(plan, folder, report)
    if logits:
        check = check_function(
            plan,
            folder,
            atol=atol,
            whole=whole,
            device=device,
            dtype=dtype,
            text=text,
            batch=batch,
            length=length,
            log=log,
        )
        report.function = check
        report.max_abs_diff = check.logits_max_abs_diff
        report.tokens = check.tokens
    return report


def _nonfinite_lines(report: VerifyReport) -> list[str]:
    """NaN or inf in a source (copied into the output) or in either model as loaded: named, at most 10."""
    names = list(report.nonfinite_sources)
    if report.function is not None:
        names += [n for n in report.function.nonfinite if not any(n.split(": ", 1)[-1] in s for s in names)]
    if not names:
        return []
    shown = [f"non-finite values (NaN or inf) in: {names[0]}"] + [f"  and {n}" for n in names[1:10]]
    if len(names) > 10:
        shown.append(f"  ... and {len(names) - 10} more tensors")
    return shown


def raise_for(report: VerifyReport, folder: Path) -> None:
    if not report.ok:
        lines = list(report.tensor_problems[:20])
        if len(report.tensor_problems) > 20:
            lines.append(f"... and {len(report.tensor_problems) - 20} more")
        if (
            report.max_abs_diff is not None
            and report.function_preserving
            and not report.max_abs_diff <= report.tolerance
        ):
            where = ""
            check = report.function
            if check is not None and check.first_divergent_layer is not None:
                row = check.layers[check.first_divergent_layer]
                diff = "no base layer to compare" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}"
                where = (
                    f"; the output first parts from the base at layer {row.output} ({row.role}, from "
                    f"{'base' if row.source == check.base_source else row.source} layer {row.layer}): "
                    f"max |residual difference| {diff}"
                )
            lines.append(
                f"max |logits - base logits| = {report.max_abs_diff:.3g} > tolerance {report.tolerance:.3g}"
                f" (--atol {report.atol:g} x max |base logits|, at least 1){where}"
            )
        lines.extend(_nonfinite_lines(report))
        raise VerifyError(f"{folder}: verification failed:\n  " + "\n  ".join(lines))
