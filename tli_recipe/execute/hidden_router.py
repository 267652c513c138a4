"""The hidden router init of an upcycled plan: each expert's router row from the MLP inputs of its prompts.

The one upcycling step that runs a model (so it does not stream): each source model whose layers
are upcycled is loaded (float32 on the CPU, its own dtype on CUDA) and runs each prompt alone, so
no padding token is ever taken for the last one. A hook before each decoder layer's MLP records
its input, which is exactly what the router of that layer sees. Row e of output layer L is the mean,
over expert e's positive prompts, of that input at the last token of the source layer L copies,
minus the mean over its negative prompts, scaled to unit length. (mergekit-moe takes the residual
stream before the layer instead, at the last position of a padded batch.)
"""

from __future__ import annotations

from typing import Callable

from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan
from tli_recipe.source.arch import load_architectures


def hidden_routers(plan: Plan, device: str, log: Callable[[str], None]) -> dict:
    """Output tensor name -> its router rows ``[E, hidden]`` (float32, CPU), for every ``hidden`` op."""
    ops = [op for op in plan.tensors if op.op == "hidden"]
    if not ops:
        return {}
    if plan.upcycle is None or not plan.upcycle.prompts:
        raise TliError("plan.json has hidden router tensors but no prompts; plan again with this tli-recipe version")
    entries = {e.output: e for e in plan.layers}
    by_source: dict[str, list] = {}
    for op in ops:
        by_source.setdefault(entries[op.layer].source, []).append(op)
    mlp = load_architectures()[plan.architecture].projections["down_proj"].modules[-1].path.rpartition(".")[0]
    out = {}
    for key, group in by_source.items():
        layers = sorted({entries[op.layer].layer for op in group})
        rows = _rows(plan.sources[key].path, plan.layer_prefix, mlp, layers, plan.upcycle.prompts, device)
        for op in group:
            out[op.name] = rows[entries[op.layer].layer]
        log(
            f"hidden router: {len(group)} routers from "
            f"{sum(len(p['positive']) + len(p['negative']) for p in plan.upcycle.prompts)} "
            f"prompts through {key} on {device}"
        )
    return out


def _rows(path: str, prefix: str, mlp: str, layers: list[int], prompts: list[dict], device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a folder without a tokenizer
        raise TliError(
            f"{path}: the hidden router init tokenizes its prompts with the source's tokenizer, and none "
            f"loads from this folder ({type(exc).__name__}); add the tokenizer files or use router: zero"
        ) from None
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device).eval()
    seen: dict[int, object] = {}
    hooks = [
        model.get_submodule(prefix.format(layer=layer) + mlp).register_forward_pre_hook(
            lambda module, args, layer=layer: seen.__setitem__(layer, args[0][0, -1].float().cpu())
        )
        for layer in layers
    ]

    def mean(texts: list[str]):
        total = {layer: 0 for layer in layers}
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise TliError(f"hidden router init: the prompt {text[:40]!r} has no tokens; expected some text")
            with torch.no_grad():
                model(input_ids=ids.to(device))
            for layer in layers:
                total[layer] = total[layer] + seen[layer]
        return {layer: value / max(len(texts), 1) for layer, value in total.items()}

    try:
        per_expert = []
        for entry in prompts:
            positive, negative = mean(entry["positive"]), mean(entry["negative"]) if entry["negative"] else None
            per_expert.append({layer: positive[layer] - (negative[layer] if negative else 0) for layer in layers})
    finally:
        for hook in hooks:
            hook.remove()
    rows = {}
    for layer in layers:
        stacked = torch.stack([expert[layer] for expert in per_expert])
        rows[layer] = stacked / stacked.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return rows
