"""Safetensors checkpoints: find them, read their headers, stream tensors in and out.

Reading headers needs no torch (a safetensors file is an 8-byte little-endian
header length, a JSON header, then raw bytes), so ``plan`` stays fast. Tensor data
is read with plain file reads at the header's offsets, one tensor at a time, and
written the same way into shards whose headers are known in advance from the plan:
peak memory is about one tensor, whatever the size of the model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import TliError

#: safetensors dtype codes and their sizes in bytes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: recipe dtype names <-> safetensors codes
CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
NAMES = {v: k for k, v in CODES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Files copied from the source beside the weights when present.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json")


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


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data begins."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file; re-download it")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise CheckpointError(f"{path}: header length {length} is not plausible; the file is not safetensors or is corrupt")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON; the file is corrupt, re-download it") from None
    return header, 8 + length


@dataclass
class Checkpoint:
    """A model directory: its config.json and, when weights are present, every tensor's location."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]   # empty when the directory holds only config.json
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


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


def resolve_model(ref: str) -> Path:
    """A local directory, or ``org/name[@revision]`` from the local Hugging Face cache.

    Nothing is downloaded: tli-recipe never reaches the network.
    """
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    repo, _, revision = ref.partition("@")
    if repo.count("/") == 1 and not local.exists():
        cache = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
        revision = revision or "main"
        ref_file = cache / "refs" / revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else revision
        snapshot = cache / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
        raise CheckpointError(
            f"'{ref}' is neither a local directory nor a model in the local Hugging Face cache; check the path, "
            f"or download it (huggingface-cli download {repo}{' --revision ' + revision if revision != 'main' else ''}; "
            "HF_HUB_CACHE or HF_HOME locate the cache), or point at a local copy (--set base_model=/path/to/model)"
        )
    raise CheckpointError(f"'{ref}' is not a directory; expected a model directory with config.json, or a hub id org/name")


def open_checkpoint(path: Path) -> Checkpoint:
    """Read config.json and every safetensors header of a model directory (no tensor data)."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: not found; a model directory needs its config.json") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")

    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: no readable weight_map ({exc}); re-download or fix the index") from None
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
        if not files and any(path.glob("*.bin")):
            raise CheckpointError(f"{path}: only PyTorch .bin weights found; convert the model to safetensors first "
                                  "(load it with transformers and save_pretrained(..., safe_serialization=True))")

    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name in files:
        file = path / name
        header, data_start = read_header(file)
        metadata.update(header.pop("__metadata__", None) or {})
        for tensor, spec in header.items():
            begin, end = spec["data_offsets"]
            if tensor in tensors:
                raise CheckpointError(f"{file}: tensor '{tensor}' is also in {tensors[tensor].file}; the checkpoint is inconsistent")
            if spec.get("dtype") not in DTYPE_SIZES:
                raise CheckpointError(f"{file}: tensor '{tensor}' has dtype {spec.get('dtype')!r}, which tli-recipe does not "
                                      f"handle; supported: {', '.join(DTYPE_SIZES)}")
            tensors[tensor] = TensorInfo(tensor, str(file), spec["dtype"], tuple(spec["shape"]), data_start + begin, data_start + end)
    if weight_map is not None:
        for tensor, name in weight_map.items():
            info = tensors.get(tensor)
            if info is None or Path(info.file).name != name:
                raise CheckpointError(f"{path / name}: tensor '{tensor}' is in {INDEX_FILE} but not in the shard; re-download or fix the index")
    return Checkpoint(path=path, config=config, tensors=tensors, metadata=metadata)


# --- tensor I/O (torch is imported only here, lazily) ------------------------------------

def torch_dtype(code: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[code]


def _truncated(info: TensorInfo, got: int) -> CheckpointError:
    return CheckpointError(f"{info.file}: tensor '{info.name}' is truncated ({got} of {info.nbytes} bytes); re-download the file")


class TensorReader:
    """Reads one tensor at a time with plain file reads (no mmap); keeps one file open."""

    def __init__(self) -> None:
        self._file: Optional[str] = None
        self._handle = None

    def _open(self, info: TensorInfo):
        if self._file != info.file:
            self.close()
            self._handle = open(info.file, "rb")
            self._file = info.file
        return self._handle

    def read(self, info: TensorInfo):
        """The tensor as a new torch tensor (read straight into its storage)."""
        import torch

        tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            handle = self._open(info)
            handle.seek(info.start)
            got = handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if got != info.nbytes:
                raise _truncated(info, got)
        return tensor

    def copy_to(self, info: TensorInfo, out) -> None:
        """Copy the tensor's bytes into the open binary file ``out`` without a pass through Python
        (``os.copy_file_range`` where the kernel has it)."""
        handle = self._open(info)
        src, dst, offset, left = handle.fileno(), out.fileno(), info.start, info.nbytes
        out.flush()
        fast = hasattr(os, "copy_file_range")
        while left:
            try:
                n = os.copy_file_range(src, dst, left, offset) if fast else 0
            except OSError:  # e.g. EXDEV on old kernels, or filesystems without support
                fast, n = False, 0
            if not fast:
                handle.seek(offset)
                n = out.write(handle.read(min(left, 64 * 2**20)))
            if n == 0:
                raise _truncated(info, info.nbytes - left)
            offset += n
            left -= n

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._file = None, None


@dataclass(frozen=True)
class ShardSpec:
    file: str
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype code, shape)


def layout_shards(tensors: Iterable[tuple[str, str, tuple[int, ...]]], shard_size: int) -> list[ShardSpec]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    groups: list[list] = [[]]
    size = 0
    for name, code, shape in tensors:
        n = nbytes(code, shape)
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, code, tuple(shape)))
        size += n
    total = len(groups)
    return [ShardSpec(f"model-{i + 1:05d}-of-{total:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _header_bytes(spec: ShardSpec, metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, code, shape in spec.tensors:
        n = nbytes(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes tensors, in the planned order, into shards whose headers are written first.

    ``write`` refuses a tensor that is not the next planned one or whose dtype or shape
    differs from the plan, so the files always match their headers.
    """

    def __init__(self, folder: Path, shards: list[ShardSpec], metadata: dict[str, str], sync: bool = False) -> None:
        self.folder, self.shards, self.metadata, self.sync = folder, shards, metadata, sync
        self._queue = [(s, t) for s in shards for t in s.tensors]
        self._pos = 0
        self._handle = None
        self._shard: Optional[ShardSpec] = None

    def _next(self, name: str) -> tuple[str, tuple[int, ...]]:
        """Check that ``name`` is the next planned tensor and open its shard; returns (dtype code, shape)."""
        if self._pos >= len(self._queue):
            raise TliError(f"tensor '{name}' is not in the plan; the plan lists {len(self._queue)} tensors")
        shard, (planned, code, shape) = self._queue[self._pos]
        if name != planned:
            raise TliError(f"tensor '{name}' arrived where the plan has '{planned}'; the executor and the plan disagree")
        if shard is not self._shard:
            self._close_file()
            self._handle = open(self.folder / shard.file, "wb")
            self._handle.write(_header_bytes(shard, self.metadata))
            self._shard = shard
        self._pos += 1
        return code, shape

    def write(self, name: str, tensor) -> int:
        """Append one tensor; returns its size in bytes."""
        import torch

        code, shape = self._next(name)
        if tuple(tensor.shape) != shape or tensor.dtype != torch_dtype(code):
            raise TliError(f"tensor '{name}': got shape {tuple(tensor.shape)} {tensor.dtype}, the plan says {shape} {code}")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        return nbytes(code, shape)

    def copy(self, name: str, info: TensorInfo, reader: TensorReader) -> int:
        """Append a source tensor's bytes unchanged (same dtype and shape): no torch, no user-space copy."""
        code, shape = self._next(name)
        if info.shape != shape or info.dtype != code:
            raise TliError(f"tensor '{name}': source '{info.name}' is {list(info.shape)} {info.dtype}, the plan says {list(shape)} {code}")
        reader.copy_to(info, self._handle)
        return info.nbytes

    def zeros(self, name: str) -> int:
        """Append a tensor of zero bytes (exact 0.0 in every float format).

        The bytes are a hole: seeking past them costs nothing, a read returns zeros, and the
        file is extended to its full size when the shard is closed (a sparse file).
        """
        code, shape = self._next(name)
        self._handle.seek(nbytes(code, shape), os.SEEK_CUR)
        return nbytes(code, shape)

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.truncate()  # a trailing hole (zeros last) still needs the file's full length
            self._handle.flush()
            if self.sync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> dict:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        self._close_file()
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1][0]
            raise TliError(f"{len(self._queue) - self._pos} planned tensors were not written (first: '{missing}')")
        total = 0
        weight_map = {}
        for shard in self.shards:
            for name, code, shape in shard.tensors:
                total += nbytes(code, shape)
                weight_map[name] = shard.file
        index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
