"""Safetensors checkpoints on disk: find them (local folder or hub cache) and read their headers.

Reading a header needs no torch (a safetensors file is an 8-byte little-endian header
length, a JSON header, then raw bytes), so ``validate`` and ``plan`` stay fast.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tli_recipe.errors import TliError

#: safetensors dtype codes and their sizes in bytes.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


#: recipe dtype names <-> safetensors codes
CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


NAMES = {v: k for k, v in CODES.items()}


INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


#: Files copied from the source beside the weights when present.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(code: str, shape: Iterable[int]) -> int:
    """Size in bytes of a tensor of safetensors dtype ``code`` and ``shape``."""
    return DTYPE_SIZES[code] * numel(shape)


class CheckpointError(TliError):
    """A checkpoint cannot be found or read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, dtype code, shape and absolute byte offsets."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return numel(self.shape)


#: Larger headers or JSON side files are refused: no real checkpoint comes near these sizes.
MAX_HEADER = 100 * 2**20
MAX_JSON_FILE = 64 * 2**20

FIX = "re-download or fix the file"


def show(value: object, limit: int = 60) -> str:
    """A value read from a checkpoint, fit to echo: printable, short (it may be hostile)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: object) -> str:
    """What a JSON value is, in words (for 'X is a JSON list, not ...')."""
    for types, word in (
        (bool, "a boolean"),
        (dict, "a JSON object"),
        (list, "a JSON list"),
        (str, "a string"),
        ((int, float), "a number"),
    ):
        if isinstance(value, types):
            return word
    return "null"


def _fix(path: Path | str, what: str, tensor: Optional[str] = None) -> CheckpointError:
    """``file: tensor 'name': what is wrong; re-download or fix the file``."""
    where = f"{path}: tensor '{show(tensor, 200)}': " if tensor is not None else f"{path}: "
    return CheckpointError(f"{where}{what}; {FIX}")


def _open_regular(path: Path):
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO or a device would
    block or never end); O_NONBLOCK makes opening a FIFO return at once so it can be refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _fix(path, "is not a regular file")
    return os.fdopen(fd, "rb")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key '{show(key)}' appears twice")
        seen[key] = value
    return seen


def _parse_json(raw: bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _fix(path, f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise _fix(path, f"{what} nests too deeply to be a real one") from None
    except ValueError as exc:  # JSONDecodeError or a duplicate key
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise _fix(path, f"{what} is not valid JSON ({show(reason, 80)})") from None


def read_json(path: Path) -> Any:
    """A JSON side file (config.json, the index): a regular file of bounded size, no duplicate keys."""
    with _open_regular(path) as f:
        raw = f.read(MAX_JSON_FILE + 1)
    if len(raw) > MAX_JSON_FILE:
        raise _fix(path, f"is larger than {MAX_JSON_FILE // 2**20} MiB, too large to be a real one")
    return _parse_json(raw, path, "the file")


def header_length(path: Path | str, first: bytes, size: int) -> int:
    """The header length the first 8 bytes of a safetensors file of ``size`` bytes declare, checked."""
    if len(first) != 8:
        raise _fix(path, f"is {size} bytes, too short to be a safetensors file")
    (length,) = struct.unpack("<Q", first)
    if length > MAX_HEADER:
        raise _fix(
            path,
            f"declares a header of {length} bytes (more than {MAX_HEADER // 2**20} MiB); "
            "it is not a safetensors file or is corrupt",
        )
    if 8 + length > size:
        raise _fix(
            path,
            f"declares a header of {length} bytes but the file has only {size - 8} after the length; it is truncated",
        )
    return length


def parse_header(path: Path | str, raw: bytes) -> dict[str, Any]:
    """The JSON header (an object) from its bytes."""
    header = _parse_json(raw, path, "the safetensors header")
    if not isinstance(header, dict):
        raise _fix(path, f"the safetensors header is {_kind(header)}, not a JSON object of tensors")
    return header


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The JSON header of a safetensors file (an object), the offset where its data begins, the file size."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        length = header_length(path, f.read(8), size)
        header = parse_header(path, f.read(length))
    return header, 8 + length, size


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, spec: object, data_start: int, size: int) -> TensorInfo:
    """One validated header entry: known dtype, a list of dims, offsets inside the data area
    whose span is exactly numel x itemsize."""
    if not isinstance(spec, dict):
        raise _fix(path, f"its header entry is {_kind(spec)}, not an object with dtype, shape and data_offsets", name)
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in spec]
    if missing:
        raise _fix(path, f"its header entry has no {' or '.join(missing)}", name)
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(code, str) or code not in DTYPE_SIZES:
        raise _fix(
            path, f"dtype {show(code)} is not one tli-recipe handles (supported: {', '.join(DTYPE_SIZES)})", name
        )
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise _fix(path, f"shape {show(shape)} is not a list of non-negative integers", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise _fix(path, f"data_offsets {show(offsets)} is not a pair of non-negative integers", name)
    begin, end = offsets
    if end < begin:
        raise _fix(path, f"data_offsets [{begin}, {end}] are reversed (the end is before the start)", name)
    expected = nbytes(code, shape)
    if end - begin != expected:
        raise _fix(
            path,
            f"data_offsets [{begin}, {end}] span {end - begin} bytes, but shape {list(shape)} of {code} "
            f"needs {expected}",
            name,
        )
    if data_start + end > size:
        raise _fix(
            path,
            f"data_offsets [{begin}, {end}] run past the end of the file (its data area holds "
            f"{size - data_start} bytes); the file is truncated or its header is wrong",
            name,
        )
    return TensorInfo(name, str(path), code, tuple(shape), data_start + begin, data_start + end)


def read_tensors(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor of one safetensors file, validated (no two share a byte), and its ``__metadata__``."""
    return header_tensors(path, *read_header(path))


def header_tensors(
    path: Path, header: dict[str, Any], data_start: int, size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The validated tensors and ``__metadata__`` of a header read from ``path`` (a file of ``size`` bytes)."""
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fix(
            path,
            f"the header's __metadata__ is {_kind(metadata)}, not an object of strings"
            if not isinstance(metadata, dict)
            else "the header's __metadata__ holds a value that is not a string",
        )
    tensors = {name: _tensor_info(path, name, spec, data_start, size) for name, spec in header.items()}
    previous = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if previous is not None and info.start < previous.end:
            raise _fix(path, f"its bytes overlap those of tensor '{show(previous.name, 200)}'", info.name)
        previous = info
    return tensors, metadata


@dataclass
class Checkpoint:
    """A model directory: its config.json and, when weights are present, every tensor's location."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]  # empty when the directory holds only config.json
    metadata: dict[str, str]

    @property
    def has_weights(self) -> bool:
        return bool(self.tensors)

    def dtype(self) -> Optional[str]:
        """The source dtype name: the most common floating dtype of its tensors, else config's."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in NAMES:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        if counts:
            return NAMES[max(counts, key=counts.get)]
        declared = self.config.get("torch_dtype") or self.config.get("dtype")
        return declared if declared in CODES else None

    def files(self) -> list[Path]:
        return sorted({Path(t.file) for t in self.tensors.values()})


#: a blob of a Hugging Face cache repo: a git blob id or an LFS sha256
_BLOB_NAME = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")


def link_problem(folder: Path, name: str) -> Optional[str]:
    """Why the file ``name`` of the source folder ``folder`` may not be read, or None when it may.

    The one link rule for every file read from a source (config.json, the index, the weights, the
    side files, a pinned file), the same in plan, run, pin and verify: ``name`` is a plain relative
    path, and it resolves inside the folder, or, in a Hugging Face cache snapshot
    (``<repo>/snapshots/<commit>``, itself no link), to a blob of that repo (``<repo>/blobs/<id>``,
    ``blobs`` no link). A missing file is no link problem (whoever needs it says it is missing)."""
    parts = Path(name).parts
    if Path(name).is_absolute() or not parts or ".." in parts or "\0" in name:
        return "is not a plain name inside the folder"
    try:
        target = (folder / name).resolve(strict=True)
        base = folder.resolve(strict=True)
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError):
        return "is a link that loops or cannot be followed"
    snapshots = folder.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        repo = snapshots.parent.resolve()
        if base != repo / "snapshots" / folder.name:
            return "is in a Hugging Face cache snapshot folder that is a link leaving its repo"
        if target.is_relative_to(base):
            return None
        if not (repo / "blobs").is_symlink() and target.parent == repo / "blobs" and _BLOB_NAME.match(target.name):
            return None
        return "is a link leaving its Hugging Face cache repo (it may point only into the repo's own blobs/)"
    return None if target.is_relative_to(base) else "is a link leaving the model folder"


def check_link(folder: Path, name: str) -> None:
    """Raise a CheckpointError when :func:`link_problem` finds one."""
    why = link_problem(folder, name)
    if why is not None:
        raise CheckpointError(
            f"{folder / name}: {why}; a source file is read only from inside its folder (copy the file in, "
            "or point at the folder that holds it; for a damaged Hugging Face cache, download the model again)"
        )


def resolve_model(ref: str) -> Path:
    """A local directory, or ``org/name[@revision]`` from the local Hugging Face cache (no network:
    ``tli_recipe.source.hub.open_model`` is the one that may download)."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    from tli_recipe.source.hub import cached_model  # hub.py imports this module

    return cached_model(ref)


def read_index(index_path: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name, each a plain file inside the folder."""
    index = read_json(index_path)
    if not isinstance(index, dict):
        raise _fix(index_path, f"is {_kind(index)}, not a JSON object with a weight_map")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise _fix(
            index_path,
            "has no weight_map"
            if weight_map is None
            else f"its weight_map is {_kind(weight_map)}, not an object mapping tensor names to shard files",
        )
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise _fix(index_path, f"its weight_map entry is {_kind(name)}, not a shard file name", tensor)
        if not name.endswith(".safetensors") or name != Path(name).name or "\\" in name or "\0" in name:
            raise _fix(
                index_path,
                f"its weight_map names the shard '{show(name)}', which is not a .safetensors "
                "file inside the model folder",
                tensor,
            )
    return weight_map


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    check_link(path, "config.json")
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: not found; a model directory needs its config.json")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise _fix(config_path, f"is {_kind(config)}, not a JSON object")
    return config


def _weight_files(path: Path) -> tuple[Optional[dict[str, str]], list[str]]:
    """The index's weight_map (None without an index) and the shard files to read."""
    index_path = path / INDEX_FILE
    check_link(path, INDEX_FILE)
    if index_path.is_file():
        weight_map = read_index(index_path)
        return weight_map, sorted(set(weight_map.values()))
    if (path / SINGLE_FILE).is_file():
        return None, [SINGLE_FILE]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files and any(path.glob("*.bin")):
        raise CheckpointError(
            f"{path}: only PyTorch .bin weights found; convert the model to safetensors first "
            "(load it with transformers and save_pretrained(..., safe_serialization=True))"
        )
    return None, files


def open_checkpoint(
    path: Path,
    read: Callable[[Path], tuple[dict[str, TensorInfo], dict[str, str]]] = read_tensors,
    files: Optional[list[str]] = None,
) -> Checkpoint:
    """Read config.json and every safetensors header of a model directory (no tensor data).

    Every header entry is validated here, so later code can trust a TensorInfo: a bad
    checkpoint is refused before anything is planned or written. ``read`` and ``files`` let
    the headers come from elsewhere (the hub, by HTTP range requests) for a folder that holds
    only config.json and the index."""
    config = _read_config(path)
    weight_map, found_files = _weight_files(path)
    files = found_files if files is None or weight_map is not None else files
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name in files:
        file = path / name
        check_link(path, name)
        found, meta = read(file)
        metadata.update(meta)
        for tensor, info in found.items():
            if tensor in tensors:
                raise _fix(file, f"is also in {tensors[tensor].file}; the checkpoint is inconsistent", tensor)
            if weight_map is not None and weight_map.get(tensor) != name:
                raise _fix(
                    file,
                    f"is in this shard but not in {INDEX_FILE}"
                    if tensor not in weight_map
                    else f"is in this shard but {INDEX_FILE} puts it in {show(weight_map[tensor])}",
                    tensor,
                )
            tensors[tensor] = info
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in tensors:
                raise _fix(path / name, f"is in {INDEX_FILE} but not in the shard", tensor)
    return Checkpoint(path=path, config=config, tensors=tensors, metadata=metadata)
