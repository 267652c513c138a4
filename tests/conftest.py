"""Shared fixtures: tiny random checkpoints built here (no downloads) and a CLI runner."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = Path(__file__).parent / "configs"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="Rewrite golden files (tests/bad_recipes/*.err) from the current output.")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


#: Tiny widths for every architecture: hidden 32, 4 heads (2 kv), vocab 64.
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
            max_position_embeddings=128)


def build_tiny(folder: Path, arch: str = "llama", layers: int = 8, tie: bool = False, dtype: str = "float32",
               seed: int = 0, **extra) -> Path:
    """A random checkpoint saved with transformers; norms are random too, so a wrong copy shows in the logits."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "granite": ("GraniteConfig", "GraniteForCausalLM"),
    }[arch]
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, tie_word_embeddings=tie, **{**TINY, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[..., Path]:
    """``tiny(arch="llama", layers=8, tie=False, dtype="float32", **config)`` -> a cached checkpoint dir."""
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            cache[key] = build_tiny(tmp_path_factory.mktemp(f"tiny-{name}"), **kwargs)
        return cache[key]

    return make


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 and mode of every file below ``folder`` (to prove inputs are untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("plan", path)`` -> click Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from tli_recipe.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def logits_of(folder: Path, ids=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if ids is None:
        ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits
