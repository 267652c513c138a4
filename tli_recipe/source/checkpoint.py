"""Safetensors checkpoints on disk: find them (local folder or hub cache) and read their headers.

Reading a header needs no torch (a safetensors file is an 8-byte little-endian header
length, a JSON header, then raw bytes), so ``validate`` and ``plan`` stay fast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tli_recipe.errors import TliError

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
