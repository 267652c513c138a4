"""Greedy generation from a base model and its grown copy: a function-preserving plan gives the same text.

python scripts/demo_generate.py BASE_DIR GROWN_DIR ["prompt"]
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(base: str, grown: str, prompt: str = "The capital of France is") -> int:
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    texts = {}
    for label, path in (("base", base), ("grown", grown)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        layers = model.config.num_hidden_layers
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=20, do_sample=False)
        texts[label] = tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)
        print(f"{label:>5} ({layers} layers): {prompt}{texts[label]!r}")
    same = texts["base"] == texts["grown"]
    print("same continuation" if same else "continuations differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
