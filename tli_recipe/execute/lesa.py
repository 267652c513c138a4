"""LESA (arXiv 2502.13794): predict a new layer's weights from its two neighbours.

For each projection type separately (one tensor suffix, e.g. ``self_attn.q_proj.weight``):

1. concatenate every layer's weight ``[out, in]`` along the input dimension:
   ``W = [W_0 | ... | W_{L-1}]``, shape ``[out, L*in]``;
2. ``U, S, Vh = svd(W)``; layer i's block is ``V_i = Vh[:, i*in:(i+1)*in]`` (``[r, in]``);
3. train a small MLP ``G`` (``2*in -> h -> h -> in``, ReLU) to predict each row of ``V_i`` from
   the same row of ``concat(V_{i-1}, V_{i+1})``, for i = 1..L-2, with loss
   ``(1 - lambda) * MSE(G(x), y) + lambda * MSE(|G(x)|, |y|)``, AdamW;
4. a layer between i and j gets ``(U diag(S)) @ G(concat(V_i, V_j))``.

This is the one policy that cannot stream tensor by tensor: it holds every layer of one
projection type at a time (in float32), plus its SVD.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class LesaResult:
    """Predicted tensors and what training them cost."""

    tensors: dict[str, object] = field(default_factory=dict)  # output name -> float32 CPU tensor
    losses: dict[str, list[float]] = field(default_factory=dict)  # suffix -> training loss per epoch
    seconds: dict[str, float] = field(default_factory=dict)  # suffix -> SVD + training time


def _predictor(width: int, hidden: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(2 * width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
    )


def svd_basis(weights: list, device: str = "cpu"):
    """The SVD of one projection type's layers stacked side by side: ``(US, blocks)``, ``blocks[i] = V_i``."""
    import torch

    width = weights[0].shape[1]
    stacked = torch.cat([w.to(device=device, dtype=torch.float32) for w in weights], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    us = u * s
    blocks = [vh[:, i * width : (i + 1) * width] for i in range(len(weights))]
    return us, blocks


def train_predictor(blocks: list, settings, device: str = "cpu"):
    """The predictor of ``V_i`` from ``[V_{i-1}, V_{i+1}]``, trained on the inner layers: ``(model, losses)``."""
    import torch

    width = blocks[0].shape[1]
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # layer initialisation below draws from the global stream
    model = _predictor(width, settings.hidden).to(device)
    if len(blocks) < 3:
        return model.eval(), []
    x = torch.cat([torch.cat([blocks[i - 1], blocks[i + 1]], dim=1) for i in range(1, len(blocks) - 1)])
    y = torch.cat([blocks[i] for i in range(1, len(blocks) - 1)])
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    lam = settings.norm_weight
    losses = []
    for _epoch in range(settings.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        total, count = 0.0, 0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            pred, target = model(x[idx]), y[idx]
            loss = (1 - lam) * torch.mean((pred - target) ** 2) + lam * torch.mean(
                (pred.norm(dim=1) - target.norm(dim=1)) ** 2
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
    return model.eval(), losses


def fit_basis(
    weights: list, settings, device: str = "cpu", log: Callable[[str], None] = lambda m: None, label: str = ""
):
    """SVD basis of one projection type and a predictor trained on it.

    ``weights``: the L layers' ``[out, in]`` tensors in layer order. Returns
    ``(US, blocks, predictor, losses)`` where ``blocks[i]`` is ``V_i``.
    """
    started = time.perf_counter()
    us, blocks = svd_basis(weights, device)
    model, losses = train_predictor(blocks, settings, device)
    if losses:
        log(
            f"lesa {label}: {sum(b.shape[0] for b in blocks[1:-1])} rows, loss {losses[0]:.3g} -> {losses[-1]:.3g} "
            f"over {settings.epochs} epochs ({time.perf_counter() - started:.1f} s)"
        )
    return us, blocks, model, losses


def predict(us, blocks, model, before: int, after: int):
    """The weight of a new layer between layers ``before`` and ``after``."""
    import torch

    with torch.no_grad():
        return (us @ model(torch.cat([blocks[before], blocks[after]], dim=1))).cpu()


def lesa_tensors(plan, sources: dict, device: str, log: Callable[[str], None] = print) -> LesaResult:
    """Every tensor that ``plan`` initialises with ``lesa``, computed one projection type at a time.

    Everything it needs is in the plan: the ops, the layer-name template and ``plan.lesa``."""
    from tli_recipe.execute.shards import TensorReader

    result = LesaResult()
    groups: dict[tuple[str, str], list] = {}
    for op in plan.tensors:
        if op.op == "lesa":
            groups.setdefault((op.source, plan.split_layer_key(op.source_name)[1]), []).append(op)
    reader = TensorReader()
    try:
        for count, ((source, suffix), ops) in enumerate(groups.items(), 1):
            started = time.perf_counter()
            n = plan.sources[source].num_layers
            weights = [reader.read(sources[source].tensors[plan.layer_key(i, suffix)]) for i in range(n)]
            label = f"{count}/{len(groups)} {suffix}" + (f" ({source})" if len(plan.sources) > 1 else "")
            log(f"lesa {label}: SVD of {weights[0].shape[0]} x {n * weights[0].shape[1]} and its predictor ...")
            us, blocks, model, losses = fit_basis(weights, plan.lesa, device, log, label)
            del weights
            for op in ops:
                before = plan.split_layer_key(op.source_name)[0]
                after = plan.split_layer_key(op.second_name)[0]
                result.tensors[op.name] = predict(us, blocks, model, before, after)
            result.losses[suffix] = losses
            result.seconds[suffix] = time.perf_counter() - started
    finally:
        reader.close()
    return result
