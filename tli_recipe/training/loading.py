"""Loading checkpoints and tokenizers for eval, train and compare: never run a checkpoint's code,
and turn every failure of transformers into one line that names the folder and what to do.

A checkpoint handed to tli-recipe is hostile input: ``trust_remote_code=False`` on every
load (a model that needs its own Python gets a clear error, not a prompt), ``config.json``
is checked before transformers reads it (an ``auto_map`` is harmless: without
trust_remote_code transformers uses its own class, or refuses), and tensors the config describes but no shard
holds are an error (transformers would silently start them from random values).
"""

from __future__ import annotations

import json
from pathlib import Path

from tli_recipe.errors import TliError, show

#: What a model folder holds when it has a tokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def torch_dtype_named(name: str):
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (the --dtype choices) -> the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class LoadError(TliError):
    """A checkpoint or tokenizer that transformers cannot load; the message names the folder."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def check_config(path: Path) -> dict:
    """``path/config.json`` as a dict, refused when transformers would choke on it or ask to run code."""
    file = path / "config.json"
    if not file.is_file():
        raise LoadError(f"{path}: no config.json; expected a model directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(
            f"{file}: not valid JSON ({_first_line(exc)}); fix the file or re-download the checkpoint"
        ) from None
    if not isinstance(config, dict):
        raise LoadError(
            f"{file}: holds a JSON {type(config).__name__}, not an object; fix the file or re-download the checkpoint"
        )
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise LoadError(
            f"{file}: model_type is {show(model_type)}, not a string; expected the architecture's name "
            "(such as 'llama'): fix config.json"
        )
    return config


def _custom_code(path: Path) -> str:
    return (
        f"{path}: the model needs its own Python code (config.json names a model_type transformers does not ship, "
        "with auto_map); tli-recipe never runs code from a checkpoint: use an architecture that transformers ships"
    )


def _message(path: Path, what: str, exc: BaseException) -> str:
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return _custom_code(path)
    if "mismatched" in text or "size mismatch" in text:
        return (
            f"{path}: config.json disagrees with the tensors (their shapes differ from what the config describes); "
            "fix config.json or re-download the checkpoint"
        )
    if isinstance(exc, KeyError) or "does not recognize this architecture" in text or "Unrecognized" in text:
        return (
            f"{path}: transformers does not know this model ({_first_line(exc)}); tli-recipe runs the "
            "architectures transformers ships: check model_type in config.json"
        )
    return (
        f"{path}: transformers could not load the {what} ({type(exc).__name__}: {_first_line(exc)}); check that "
        "config.json matches the tensors, or re-download the checkpoint"
    )


def load_config(path: Path):
    """``AutoConfig`` of a checkpoint, without running its code."""
    from transformers import AutoConfig

    check_config(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - every failure of transformers becomes one message
        raise LoadError(_message(path, "config", exc)) from None


def load_model(path: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs)``, refusing missing tensors."""
    from transformers import AutoModelForCausalLM

    check_config(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, output_loading_info=True, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - every failure of transformers becomes one message
        raise LoadError(_message(path, "model", exc)) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise LoadError(
            f"{path}: {len(missing)} tensors the config describes are in no shard (first: '{missing[0]}'); "
            "the checkpoint is incomplete or config.json is wrong: re-download it or fix config.json"
        )
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched:
        raise LoadError(_message(path, "model", RuntimeError("mismatched")))
    return model


def load_tokenizer(path: Path, hint: str):
    """``AutoTokenizer`` of a folder, without running its code; ``hint`` says what to do without one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - every failure of transformers becomes one message
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise LoadError(
                f"{path}: the tokenizer needs its own Python code; tli-recipe never runs code from a checkpoint: {hint}"
            ) from None
        raise LoadError(f"{path}: no tokenizer could be loaded ({_first_line(exc)}); {hint}") from None
