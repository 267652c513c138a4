"""Hostile MoD heads (``mod_head.safetensors`` beside a model): read like a checkpoint header.

Each case writes a head next to a tiny model with a tokenizer and runs `eval` on it: a
tampered head is refused with one bounded line (exit 2), never scored as nan or a
309-digit perplexity, and a head that is a link is refused rather than silently ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tli_recipe.training import mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import build_tiny
    from tiny_text import add_char_tokenizer

    return add_char_tokenizer(build_tiny(tmp_path_factory.mktemp("mod-model"), layers=4))


@pytest.fixture(scope="module")
def head_tensors(model_dir):
    from tli_recipe.training.loading import load_model

    head = mod.new_head(load_model(model_dir), [2, 3])
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@pytest.fixture
def folder(tmp_path, model_dir):
    from tiny_text import write_text

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    write_text(tmp_path / "held.txt", 20)
    return copy


def write_head(folder: Path, tensors: dict, layers="[2, 3]", **meta) -> None:
    from safetensors.torch import save_file

    metadata = {"format": mod.FORMAT, "version": mod.VERSION, "layers": layers, "distill_weight": "0.5", **meta}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / mod.HEAD_FILE), metadata=metadata)


def evaluate(cli, folder: Path):
    return cli("eval", folder, "--data", folder.parent / "held.txt", "--device", "cpu", "--sequence-length", "16")


def test_a_good_head_is_scored(folder, head_tensors, hostile_cli):
    write_head(folder, head_tensors)
    result = evaluate(hostile_cli, folder)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_gate_is_refused_not_scored_nan(folder, head_tensors, hostile_cli, refused, snapshot, value):
    write_head(folder, {**head_tensors, "gate": head_tensors["gate"].clone().fill_(value)})
    inputs = snapshot(folder)
    refused(
        evaluate(hostile_cli, folder),
        "mod_head.safetensors: tensor 'gate' holds NaN or infinite values",
        inputs=inputs,
    )


def test_a_non_finite_router_weight_is_refused(folder, head_tensors, hostile_cli, refused):
    weight = head_tensors["router.weight"].clone()
    weight[0, 0] = float("nan")
    write_head(folder, {**head_tensors, "router.weight": weight})
    refused(evaluate(hostile_cli, folder), "tensor 'router.weight' holds NaN or infinite values")


def test_a_huge_gate_is_refused_not_printed_as_a_309_digit_perplexity(folder, head_tensors, hostile_cli, refused):
    write_head(folder, {**head_tensors, "gate": head_tensors["gate"].clone().fill_(3e38)})
    result = evaluate(hostile_cli, folder)
    refused(result, "mod_head.safetensors: the gate is 3e+38, outside +-1000")


def test_a_million_layers_in_the_metadata_are_counted_not_echoed(folder, head_tensors, hostile_cli, refused):
    write_head(folder, head_tensors, layers=json.dumps(list(range(100_000))))
    result = evaluate(hostile_cli, folder)
    refused(result, "a metadata value longer than 65,536 characters")
    assert len(result.output) < 1000
    write_head(folder, head_tensors, layers=json.dumps(list(range(5000))))
    result = evaluate(hostile_cli, folder)
    refused(result, "its metadata 'layers' lists 5,000 layers and the model has 4")
    assert len(result.output) < 1000


@pytest.mark.parametrize("kind", ["dev-zero", "link-to-good-head", "directory"])
def test_a_head_that_is_not_a_regular_file_is_refused_not_ignored(
    folder, head_tensors, hostile_cli, refused, tmp_path, kind
):
    path = folder / mod.HEAD_FILE
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        write_head(tmp_path, head_tensors)
        path.symlink_to(tmp_path / mod.HEAD_FILE)
    refused(
        evaluate(hostile_cli, folder),
        "mod_head.safetensors: " + ("not a regular file" if kind == "directory" else "a symbolic link"),
    )


def test_a_head_with_a_hostile_header_is_refused_with_one_line(folder, hostile_cli, refused):
    (folder / mod.HEAD_FILE).write_bytes((10**12).to_bytes(8, "little") + b"{}")
    refused(evaluate(hostile_cli, folder), "mod_head.safetensors: declares a header of 1000000000000 bytes")
