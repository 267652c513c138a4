"""Hostile checkpoints: every corrupt header, index or config is refused on open.

Each case copies a tiny model, corrupts the copy, and asserts that both `plan` and `run`
exit 2 with ``file: [tensor 'name': ]what is wrong; re-download or fix the file``, no
traceback, the inputs byte-identical and nothing written beside the target. Before
these checks `run` exited 0 on several of them, having written a shard that safetensors
refuses to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from conftest import write_recipe

FIX = "re-download or fix the file"
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"
INDEX = "model.safetensors.index.json"


def split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def rewrite_header(file: Path, edit) -> None:
    """Replace the header of ``file`` by ``edit(header)`` (a JSON value, or raw bytes), keeping the data."""
    header, data = split(file)
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entry(**changes):
    """An edit that changes fields of tensor Q's header entry (None deletes a field)."""

    def edit(header):
        for key, value in changes.items():
            if value is None:
                del header[Q][key]
            else:
                header[Q][key] = value
        return header

    return edit


def with_index(folder: Path, edit=lambda wm: wm) -> None:
    """Give the single-file checkpoint an index (``edit`` may corrupt its weight_map)."""
    header, _ = split(folder / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": edit(weight_map)}))


def drop(name):
    def edit(weight_map):
        del weight_map[name]
        return weight_map

    return edit


def header_case(edit):
    return lambda folder: rewrite_header(folder / "model.safetensors", edit)


def truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 64)


def header_length(length: int):
    def corrupt(folder: Path) -> None:
        file = folder / "model.safetensors"
        raw = file.read_bytes()
        file.write_bytes(struct.pack("<Q", length) + raw[8:])

    return corrupt


def overlap(header):
    header[V]["data_offsets"] = header[K]["data_offsets"]  # k and v have the same size
    return header


def swap(header):
    header[Q]["data_offsets"] = header[Q]["data_offsets"][::-1]
    return header


def fifo_shard(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model-00001-of-00001.safetensors")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


M = "model.safetensors"
#: id -> (corrupt the copy, the message expected (after the folder), as a regex)
CASES = {
    "header is a list": (header_case(lambda h: [h]), rf"{M}: the safetensors header is a JSON list, not a JSON object"),
    "header is not json": (header_case(lambda h: b"{not json"), rf"{M}: the safetensors header is not valid JSON"),
    "header not utf-8": (header_case(lambda h: b'{"\xff": 1}'), rf"{M}: the safetensors header is not UTF-8"),
    "header nests deeply": (header_case(lambda h: nested(100_000)), rf"{M}: the safetensors header nests too deeply"),
    "duplicate tensor": (
        header_case(lambda h: json.dumps(h).replace("{", '{"' + Q + '": 1, ', 1).encode()),
        rf"{M}: the safetensors header is not valid JSON \(the key '{Q}' appears twice\)",
    ),
    "header too large": (header_length(2**40), rf"{M}: declares a header of {2**40} bytes \(more than 100 MiB\)"),
    "header past end": (header_length(10**6), rf"{M}: declares a header of 1000000 bytes but the file has only"),
    "file too short": (
        lambda f: (f / M).write_bytes(b"\x01\x02"),
        rf"{M}: is 2 bytes, too short to be a safetensors file",
    ),
    "missing data_offsets": (
        header_case(entry(data_offsets=None)),
        rf"{M}: tensor '{Q}': its header entry has no data_offsets",
    ),
    "shape is an int": (
        header_case(entry(shape=64)),
        rf"{M}: tensor '{Q}': shape 64 is not a list of non-negative integers",
    ),
    "negative dim": (header_case(entry(shape=[-32, -32])), rf"{M}: tensor '{Q}': shape \[-32, -32\] is not a list"),
    "string dim": (header_case(entry(shape=["32", 32])), rf"{M}: tensor '{Q}': shape \[\"32\", 32\] is not a list"),
    "float dim": (header_case(entry(shape=[32.0, 32])), rf"{M}: tensor '{Q}': shape \[32.0, 32\] is not a list"),
    "bool dim": (header_case(entry(shape=[True, 32])), rf"{M}: tensor '{Q}': shape \[true, 32\] is not a list"),
    "unknown dtype": (header_case(entry(dtype="F12")), rf"{M}: tensor '{Q}': dtype F12 is not one tli-recipe handles"),
    "dtype not a string": (header_case(entry(dtype=4)), rf"{M}: tensor '{Q}': dtype 4 is not one tli-recipe handles"),
    "string metadata": (
        header_case(lambda h: {**h, "__metadata__": "pt"}),
        rf"{M}: the header's __metadata__ is a string, not an object of strings",
    ),
    "metadata value not a string": (
        header_case(lambda h: {**h, "__metadata__": {"format": 1}}),
        rf"{M}: the header's __metadata__ holds a value that is not a string",
    ),
    "string tensor entry": (
        header_case(lambda h: {**h, Q: "F32"}),
        rf"{M}: tensor '{Q}': its header entry is a string, not an object",
    ),
    "offsets not a pair": (
        header_case(entry(data_offsets=[0, 4096, 8192])),
        rf"{M}: tensor '{Q}': data_offsets \[0, 4096, 8192\] is not a pair",
    ),
    "span differs": (
        header_case(entry(shape=[16, 32])),
        rf"{M}: tensor '{Q}': data_offsets \[\d+, \d+\] span 4096 bytes, but shape \[16, 32\] of F32 needs 2048",
    ),
    "offsets past the end": (
        truncate,
        rf"{M}: tensor '[^']+': data_offsets \[\d+, \d+\] run past the end of the file "
        r"\(its data area holds \d+ bytes\); the file is truncated",
    ),
    "reversed offsets": (header_case(swap), rf"{M}: tensor '{Q}': data_offsets \[\d+, \d+\] are reversed"),
    "overlapping offsets": (
        header_case(overlap),
        rf"{M}: tensor .({K}|{V}).: its bytes overlap those of tensor .({K}|{V}).",
    ),
    "shard is a fifo": (fifo_shard, r"model-00001-of-00001.safetensors: is not a regular file"),
    "index weight_map value not a string": (
        lambda f: with_index(f, lambda wm: {**wm, Q: 7}),
        rf"{INDEX}: tensor '{Q}': its weight_map entry is a number, not a shard file name",
    ),
    "index weight_map is a list": (
        lambda f: with_index(f, lambda wm: list(wm)),
        rf"{INDEX}: its weight_map is a JSON list, not an object",
    ),
    "index names a shard outside": (
        lambda f: with_index(f, lambda wm: {**wm, Q: "../x.safetensors"}),
        rf"{INDEX}: tensor '{Q}': its weight_map names the shard '../x.safetensors', which is not "
        r"a .safetensors file inside the model folder",
    ),
    "index names a non-shard": (
        lambda f: with_index(f, lambda wm: {**wm, Q: "config.json"}),
        rf"{INDEX}: tensor '{Q}': its weight_map names the shard 'config.json'",
    ),
    "tensor in shard not in index": (
        lambda f: with_index(f, drop(Q)),
        rf"{M}: tensor '{Q}': is in this shard but not in {INDEX}",
    ),
    "index is a list": (
        lambda f: (f / INDEX).write_text("[]"),
        rf"{INDEX}: is a JSON list, not a JSON object with a weight_map",
    ),
    "index without weight_map": (lambda f: (f / INDEX).write_text("{}"), rf"{INDEX}: has no weight_map"),
    "config is a list": (
        lambda f: (f / "config.json").write_text("[1]"),
        r"config.json: is a JSON list, not a JSON object",
    ),
    "config is not json": (lambda f: (f / "config.json").write_text("{"), r"config.json: the file is not valid JSON"),
}


@pytest.fixture
def corrupt_copy(tmp_path, tiny):
    def make(corrupt) -> Path:
        folder = tmp_path / "model"
        shutil.copytree(tiny(), folder)
        corrupt(folder)
        return folder

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_checkpoint_is_refused_by_plan_and_run(case, corrupt_copy, tmp_path, hostile_cli, snapshot, refused):
    corrupt, message = CASES[case]
    folder = corrupt_copy(corrupt)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"base_model: {folder}\noutput: {out}\ninject: {{every: 4}}\n")
    inputs = snapshot(folder, recipe.parent / "model")
    expected = re.compile(re.escape(str(folder)) + "/" + message + r".*; " + re.escape(FIX))
    for command in ("plan", "run"):
        refused(
            hostile_cli(command, recipe, "--no-progress") if command == "run" else hostile_cli(command, recipe),
            expected,
            inputs=inputs,
            target=out,
        )
    assert not out.exists()


def test_an_intact_copy_with_an_index_is_accepted(corrupt_copy, tmp_path, hostile_cli):
    """The control case: the helpers themselves do not corrupt anything."""
    folder = corrupt_copy(lambda f: (rewrite_header(f / M, lambda h: h), with_index(f)))
    recipe = write_recipe(tmp_path, f"base_model: {folder}\noutput: {tmp_path / 'out'}\ninject: {{every: 4}}\n")
    result = hostile_cli("plan", recipe)
    assert result.exit_code == 0, result.output
