"""What the one non-streaming op costs: an estimate of LESA's work from the plan's shapes alone.

LESA (``init: lesa``) fits one SVD and one small predictor per projection type over all layers
of the source, before the first byte is written. For a projection ``[out, in]`` of a source with
``L`` layers it factors the ``out x (L * in)`` stack (``4 m^2 n + 8 m^3`` flops for an ``m x n``
matrix, ``m <= n``) and trains the predictor ``2 in -> h -> h -> in`` on ``k (L - 2)`` rows (``k =
min(out, L * in)`` singular directions) for ``epochs`` epochs at ``6 h (3 in + h)`` flops per row
(forward and backward). The rates below turn flops into time; ``CPU_FLOPS`` was measured by
``benchmarks/lesa_benchmark.py`` (Llama-3.2-1B shapes on the 2-core development machine), so
the estimate is for a small CPU; more cores or a GPU take a fraction of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tli_recipe.plan.model import Plan

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
