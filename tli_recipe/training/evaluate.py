"""Mean loss and perplexity of several checkpoints on the same held-out tokens.

The text is tokenized once (with the first model's tokenizer, or ``tokenizer``) and
packed into sequences of ``sequence_length``; every model sees exactly these ids, so
base, grown and trained models compare directly. The loss is the mean next-token
cross-entropy in nats over every predicted token, accumulated in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tli_recipe.errors import TliError
from tli_recipe.training.data import pack, tokenize
from tli_recipe.training.loading import (
    check_config,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    torch_dtype_named,
)
from tli_recipe.training.mod import has_mod_head
from tli_recipe.training.mod import load as load_mod


@dataclass
class EvalResult:
    model: str
    loss: float
    perplexity: float
    tokens: int  # predicted tokens
    sequences: int
    forward_seconds: float = 0.0  # the forward passes alone (no loading, no tokenizing)

    def to_dict(self) -> dict:
        return asdict(self)


def _tokenizer(path: Path):
    return load_tokenizer(path, "pass --tokenizer DIR (the base model's)")


def evaluate_models(
    models: Sequence[str | Path],
    data: Sequence[str | Path],
    *,
    sequence_length: Optional[int] = None,
    batch_size: int = 8,
    max_sequences: Optional[int] = None,
    tokenizer: Optional[str | Path] = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: str = "float32",
    log: Callable[[str], None] = lambda m: None,
) -> list[EvalResult]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    paths = [Path(m) for m in models]
    for path in paths:
        check_config(path)
    tok_path = Path(tokenizer) if tokenizer else paths[0]
    tok = _tokenizer(tok_path)
    vocab = tok.get_vocab()
    for path in paths[1:] if not tokenizer else []:
        if has_tokenizer(path) and _tokenizer(path).get_vocab() != vocab:
            raise TliError(
                f"{path}: its tokenizer differs from {tok_path}'s, so the models would not see the same "
                "tokens; compare models that share a tokenizer, or force one with --tokenizer DIR"
            )
    if sequence_length is None:
        limit = getattr(load_config(paths[0]), "max_position_embeddings", None) or 1024
        sequence_length = min(1024, int(limit))
    ids = tokenize([(p, text_field) for p in data], tok)
    blocks = pack(ids, sequence_length, keep_short=True)
    if not blocks:
        raise TliError(f"the data has {len(ids)} tokens; expected at least 2 to predict one")
    if max_sequences is not None:
        blocks = blocks[:max_sequences]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch_dtype_named(dtype)
    log(
        f"{len(blocks)} sequences of {len(blocks[0])} tokens ({sum(len(b) - 1 for b in blocks):,} predicted tokens) "
        f"from {', '.join(str(d) for d in data)}"
    )

    results = []
    for path in paths:
        if has_mod_head(path):  # a MoD stage's output: scored with its ensemble head, as it predicts
            model = load_mod(path, dtype=dtype, device=device)
        else:
            model = load_model(path, dtype=torch_dtype).to(device).eval()
        total, count = 0.0, 0
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                batch = torch.tensor(blocks[start : start + batch_size], dtype=torch.long, device=device)
                logits = model(input_ids=batch).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(loss.double())
                count += batch[:, 1:].numel()
        del model
        mean = total / count
        results.append(
            EvalResult(
                model=str(path),
                loss=mean,
                perplexity=math.exp(min(mean, 700)),
                tokens=count,
                sequences=len(blocks),
                forward_seconds=time.perf_counter() - started,
            )
        )
    return results


def results_table(results: list[EvalResult]) -> str:
    width = max(len("model"), *(len(r.model) for r in results))
    lines = [f"{'model':<{width}}  {'loss':>8}  {'perplexity':>10}  {'vs first':>9}  tokens"]
    for r in results:
        delta = r.loss - results[0].loss
        ppl = f"{r.perplexity:10.3f}" if r.perplexity < 1e6 else f"{r.perplexity:10.3e}"  # never 300 digits
        lines.append(f"{r.model:<{width}}  {r.loss:8.4f}  {ppl}  {delta:+9.4f}  {r.tokens:,}")
    return "\n".join(lines)
