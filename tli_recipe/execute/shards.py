"""Tensor bytes in and out: read one tensor at a time, write shards whose headers are known first.

Tensor data is read with plain file reads at the header's offsets and written into
shards laid out in advance from the plan: peak memory is about one tensor, whatever
the size of the model. torch is imported only here, lazily, when a tensor is computed.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tli_recipe.errors import TliError
from tli_recipe.source.checkpoint import (
    FIX,
    INDEX_FILE,
    CheckpointError,
    TensorInfo,
    nbytes,
    read_header,
    read_json,
    read_tensors,
)


def torch_dtype(code: str):
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }[code]


def _truncated(info: TensorInfo, got: int) -> CheckpointError:
    # The header was checked against the file size on open, so a short read means the file
    # shrank (or changed) since: say so, not a byte count that contradicts the header.
    return CheckpointError(
        f"{info.file}: tensor '{info.name}': only {got} of its {info.nbytes} bytes could be read; "
        "the file is now shorter than its header says (it changed while tli-recipe was reading it); "
        "re-download or fix the file"
    )


def grown(buffer, size: int):
    """``buffer`` (a 1-D uint8 tensor, or None) if it holds ``size`` bytes, else a new one that does.

    Reusing one buffer for tensor after tensor saves the page faults of fresh memory: on the
    1.1B benchmark, reads into a reused buffer take 0.5 s instead of 1.2 s, and casts into one
    0.65 s instead of 1.1 s (measured)."""
    import torch

    return buffer if buffer is not None and buffer.numel() >= size else torch.empty(max(size, 1), dtype=torch.uint8)


def view_of(buffer, code: str, shape: tuple[int, ...]):
    """The first bytes of ``buffer`` as a tensor of dtype ``code`` and ``shape``."""
    return buffer[: nbytes(code, shape)].view(torch_dtype(code)).view(shape)


class TensorReader:
    """Reads one tensor at a time with plain file reads (no mmap); keeps one file open.

    With ``reuse``, a read returns a view of one of the reader's buffers (``slot`` 0 or 1), valid
    until the next read into the same slot: for a caller that consumes each tensor at once."""

    def __init__(self, reuse: bool = False) -> None:
        self._file: Optional[str] = None
        self._handle = None
        self._reuse = reuse
        self._slots: list = [None, None]

    def _open(self, info: TensorInfo):
        if self._file != info.file:
            self.close()
            self._handle = open(info.file, "rb")
            self._file = info.file
        return self._handle

    def read(self, info: TensorInfo, slot: int = 0):
        """The tensor as a torch tensor (read straight into its storage): a new one, or with ``reuse``
        a view of buffer ``slot``."""
        import torch

        if self._reuse:
            self._slots[slot] = grown(self._slots[slot], info.nbytes)
            tensor = view_of(self._slots[slot], info.dtype, info.shape)
        else:
            tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            handle = self._open(info)
            handle.seek(info.start)
            got = handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if got != info.nbytes:
                raise _truncated(info, got)
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._file = None, None


#: Threads that copy unchanged tensors (``copy_file_range`` with explicit offsets, so they run side by
#: side with each other and with the main thread's computed tensors; the GIL is released in the call).
COPY_THREADS = 2
_CHUNK = 64 * 2**20
_OPEN_SHARDS_PER_LANE = 4  # shards whose copies may still be queued, per lane, before the writer waits


def copy_range(info: TensorInfo, dst: int, dst_offset: int) -> None:
    """Copy a source tensor's bytes to ``dst_offset`` of the open file ``dst``, in the kernel where it
    can (``os.copy_file_range``), else through a 64 MiB buffer; a source shorter than its header says
    is an error, not a short tensor."""
    src = os.open(info.file, os.O_RDONLY)
    try:
        offset, out, left = info.start, dst_offset, info.nbytes
        fast = hasattr(os, "copy_file_range")
        while left:
            try:
                n = os.copy_file_range(src, dst, left, offset, out) if fast else 0
            except OSError:  # e.g. EXDEV on old kernels, or filesystems without support
                fast, n = False, 0
            if not fast:
                data = os.pread(src, min(left, _CHUNK), offset)
                n = os.pwrite(dst, data, out) if data else 0
            if n == 0:
                raise _truncated(info, info.nbytes - left)
            offset, out, left = offset + n, out + n, left - n
    finally:
        os.close(src)


def write_at(dst: int, view: memoryview, offset: int, keep=None) -> None:
    """Write all of ``view`` at ``offset`` of the open file ``dst`` (``keep``: the tensor behind ``view``)."""
    done = 0
    while done < len(view):
        done += os.pwrite(dst, view[done:], offset + done)


@dataclass(frozen=True)
class ShardSpec:
    file: str
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype code, shape)


#: Outputs of at least this size are split into a multiple of ``COPY_THREADS`` shards of about equal
#: size, so the copy threads each write their own file: a filesystem serializes the writes to one file
#: (two threads into one file: +7%; into two files: 1.8x, measured with copy_file_range on ext4).
PARALLEL_MIN_BYTES = 2**30


def layout_shards(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], shard_size: int, parts: int = COPY_THREADS
) -> list[ShardSpec]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor gets its own).

    The fewest shards that fit, of about equal size; an output of ``PARALLEL_MIN_BYTES`` or more gets a
    multiple of ``parts`` shards (one per copy thread). Falls back to filling each shard in turn when
    equal parts would overflow one (tensors larger than a part)."""
    items = [(name, code, tuple(shape), nbytes(code, shape)) for name, code, shape in tensors]
    total = sum(n for *_, n in items)
    count = max(1, -(-total // shard_size))
    if total >= PARALLEL_MIN_BYTES and parts > 1:
        count = -(-count // parts) * parts
    groups = _equal_parts(items, total, count) if count > 1 else [items]
    if any(len(g) > 1 and sum(n for *_, n in g) > shard_size for g in groups):
        groups = _fill_in_turn(items, shard_size)
    return [
        ShardSpec(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", tuple(t[:3] for t in g))
        for i, g in enumerate(groups)
    ]


def _equal_parts(items: list, total: int, count: int) -> list[list]:
    """Contiguous runs of about ``total / count`` bytes: each tensor goes to the part its middle falls in."""
    groups: list[list] = [[] for _ in range(count)]
    start = 0
    for item in items:
        middle = start + item[3] / 2
        groups[min(count - 1, int(middle * count / total))].append(item)
        start += item[3]
    return [g for g in groups if g]


def _fill_in_turn(items: list, shard_size: int) -> list[list]:
    groups: list[list] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item[3] > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[3]
    return groups


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
    differs from the plan, so the files always match their headers. Unchanged tensors are
    copied by ``copy_threads`` lanes, one thread each; all the copies of a shard run in one
    lane (in order), and each new shard goes to the lane with the fewest bytes queued, so the
    lanes write different files side by side. A shard is finished (synced, closed) in its
    lane after its last copy; ``close`` waits for every lane.
    """

    def __init__(
        self,
        folder: Path,
        shards: list[ShardSpec],
        metadata: dict[str, str],
        sync: bool = False,
        copy_threads: int = COPY_THREADS,
    ) -> None:
        self.folder, self.shards, self.metadata, self.sync = folder, shards, metadata, sync
        self._queue = [(s, t) for s in shards for t in s.tensors]
        self._pos = 0
        self._handle = None
        self._shard: Optional[ShardSpec] = None
        self._lanes: list = []  # one single-thread executor per lane, started on the first copy
        self._queued = [0] * max(1, copy_threads)  # bytes given to each lane so far
        self._lane: Optional[int] = None  # the open shard's lane
        self._futures: list = []  # every copy and finish job, in submission order
        self._files: list = []  # every shard file opened, closed by its lane or by close/abort
        self._finishing: list = []  # finish jobs of shards handed to their lanes, oldest first
        self._in_flight = None  # the computed tensor being written
        self._failure: Optional[BaseException] = None  # the first job that failed, noted by its lane
        self._in_flight_ptr: Optional[int] = None  # the address of its bytes
        self._buffers: list = [None, None]  # two output buffers, used in turn (one may be in flight)
        self._turn = 0

    def _next(self, name: str) -> tuple[str, tuple[int, ...]]:
        """Check that ``name`` is the next planned tensor and open its shard; returns (dtype code, shape)."""
        if self._pos >= len(self._queue):
            raise TliError(f"tensor '{name}' is not in the plan; the plan lists {len(self._queue)} tensors")
        shard, (planned, code, shape) = self._queue[self._pos]
        if name != planned:
            raise TliError(
                f"tensor '{name}' arrived where the plan has '{planned}'; the executor and the plan disagree"
            )
        self._raise_failed()
        if shard is not self._shard:
            self._close_file()
            self._handle = open(self.folder / shard.file, "wb")
            self._files.append(self._handle)
            self._handle.write(_header_bytes(shard, self.metadata))
            self._shard, self._lane = shard, None
        self._pos += 1
        return code, shape

    def buffer(self, code: str, shape: tuple[int, ...]):
        """A tensor of dtype ``code`` and ``shape`` to compute the next tensor into, then ``write``.

        Two buffers serve in turn, so one is written while the other is filled; a buffer whose
        write is still running is waited for before it is handed out again."""
        self._turn ^= 1
        buf = self._buffers[self._turn] = grown(self._buffers[self._turn], nbytes(code, shape))
        if self._in_flight is not None and self._in_flight_ptr == buf.data_ptr():
            self._in_flight.result()
        return view_of(buf, code, shape)

    def write(self, name: str, tensor) -> int:
        """Append one tensor; returns its size in bytes."""
        import torch

        code, shape = self._next(name)
        if tuple(tensor.shape) != shape or tensor.dtype != torch_dtype(code):
            raise TliError(
                f"tensor '{name}': got shape {tuple(tensor.shape)} {tensor.dtype}, the plan says {shape} {code}"
            )
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            # Written in the shard's lane while the next tensor is computed; one tensor in flight at most.
            if self._in_flight is not None:
                self._in_flight.result()
            self._handle.flush()
            offset = self._handle.tell()
            self._submit(
                data.numel() * data.element_size(),
                write_at,
                self._handle.fileno(),
                memoryview(data.reshape(-1).view(torch.uint8).numpy()),
                offset,
                data,
            )
            self._in_flight, self._in_flight_ptr = self._futures[-1], data.data_ptr()
            self._handle.seek(nbytes(code, shape), os.SEEK_CUR)
        return nbytes(code, shape)

    def copy(self, name: str, info: TensorInfo) -> int:
        """Append a source tensor's bytes unchanged (same dtype and shape): no torch, no user-space copy.

        The copy runs in the shard's lane at the tensor's own offset (the file position moves past
        it at once); the shard is complete when its lane has run its finish job."""
        code, shape = self._next(name)
        if info.shape != shape or info.dtype != code:
            raise TliError(
                f"tensor '{name}': source '{info.name}' is {list(info.shape)} {info.dtype}, the plan says "
                f"{list(shape)} {code}"
            )
        if info.nbytes:
            self._handle.flush()
            offset = self._handle.tell()
            self._submit(info.nbytes, copy_range, info, self._handle.fileno(), offset)
            self._handle.seek(info.nbytes, os.SEEK_CUR)
        return info.nbytes

    def _submit(self, size: int, job, *args) -> None:
        if not self._lanes:
            from concurrent.futures import ThreadPoolExecutor

            self._lanes = [
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tli-recipe-copy{i}")
                for i in range(len(self._queued))
            ]
        if self._lane is None:
            self._lane = min(range(len(self._queued)), key=self._queued.__getitem__)
        self._queued[self._lane] += size
        future = self._lanes[self._lane].submit(job, *args)
        future.add_done_callback(self._note_failure)
        self._futures.append(future)

    def _note_failure(self, future) -> None:  # in the lane's thread; an attribute store is atomic
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()

    def _raise_failed(self) -> None:
        """A job that already failed stops the run at the next tensor rather than at ``close``."""
        if self._failure is not None:
            raise self._failure

    def zeros(self, name: str) -> int:
        """Append a tensor of zero bytes (exact 0.0 in every float format).

        The bytes are a hole: seeking past them costs nothing, a read returns zeros, and the
        file is extended to its full size when the shard is closed (a sparse file).
        """
        code, shape = self._next(name)
        self._handle.seek(nbytes(code, shape), os.SEEK_CUR)
        return nbytes(code, shape)

    def _close_file(self) -> None:
        """The open shard gets its full length; it is synced and closed after its last copy (in its
        lane), or at once when it has none."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.truncate()  # a trailing hole (zeros last) still needs the file's full length
            handle.flush()
            if self._lane is None:
                self._finish(handle)
                return
            self._submit(0, self._finish, handle)
            self._finishing.append(self._futures[-1])
            while len(self._finishing) > _OPEN_SHARDS_PER_LANE * len(self._queued):
                self._finishing.pop(0).result()  # bounded look-ahead: open files, queued jobs

    def _finish(self, handle) -> None:
        if self.sync:
            os.fsync(handle.fileno())
        handle.close()

    def close(self, metadata: Optional[dict[str, str]] = None) -> dict:
        """Finish the last shard and write the index; every planned tensor must have been written.

        ``metadata`` replaces the metadata the headers were written with (digests known only
        once the data is written); each header is rewritten in place, so it must keep its size.
        """
        self._close_file()
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1][0]
            raise TliError(f"{len(self._queue) - self._pos} planned tensors were not written (first: '{missing}')")
        futures, self._futures, self._finishing = self._futures, [], []
        for future in futures:
            future.result()  # the first failed copy, in order
        self._stop_lanes()
        if metadata is not None and metadata != self.metadata:
            self._restamp(metadata)
        total = 0
        weight_map = {}
        for shard in self.shards:
            for name, code, shape in shard.tensors:
                total += nbytes(code, shape)
                weight_map[name] = shard.file
        index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def _restamp(self, metadata: dict[str, str]) -> None:
        for shard in self.shards:
            old, new = _header_bytes(shard, self.metadata), _header_bytes(shard, metadata)
            if len(old) != len(new):
                raise TliError(
                    f"{shard.file}: the final metadata needs a {len(new)}-byte header where "
                    f"{len(old)} bytes were reserved; this is a bug in tli-recipe"
                )
            with open(self.folder / shard.file, "r+b") as f:
                f.write(new)
                f.flush()
                if self.sync:
                    os.fsync(f.fileno())
        self.metadata = metadata

    def _stop_lanes(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        self._lanes = []

    def abort(self) -> None:
        """After a failure: no copy keeps writing (queued ones are cancelled, running ones finish)."""
        self._futures, self._finishing = [], []
        self._stop_lanes()
        for handle in self._files:
            handle.close()  # a no-op for the files their lanes closed
        self._handle = None


def check_written(folder: Path, shards: list[ShardSpec]) -> None:
    """Re-read every written shard and the index and check them against the layout.

    Each shard's header must list exactly its planned tensors (names, dtypes, shapes, in
    order), their bytes must cover the data area with no gap or overlap, and the file must
    end where the last tensor ends: what safetensors itself requires to load the file.
    Run before the output is swapped into place, so a bad shard never becomes the output.
    """
    for shard in shards:
        path = folder / shard.file
        try:
            tensors, _ = read_tensors(path)
        except CheckpointError as exc:
            raise _unsound(str(exc).removesuffix(f"; {FIX}")) from None
        found = [(t.name, t.dtype, t.shape) for t in sorted(tensors.values(), key=lambda t: t.start)]
        if found != list(shard.tensors):
            raise _unsound(
                f"{path}: its header lists other tensors than the plan ({len(found)} for {len(shard.tensors)})"
            )
        _, position, size = read_header(path)  # position: where the data area begins
        for info in sorted(tensors.values(), key=lambda t: t.start):
            if info.start != position:
                raise _unsound(f"{path}: the bytes before tensor '{info.name}' belong to no tensor")
            position = info.end
        if position != size:
            raise _unsound(f"{path}: the file is {size} bytes, its tensors end at byte {position}")
    weight_map = {name: s.file for s in shards for name, _, _ in s.tensors}
    index = read_json(folder / INDEX_FILE)
    if not isinstance(index, dict) or index.get("weight_map") != weight_map:
        raise _unsound(f"{folder / INDEX_FILE}: its weight_map differs from the shards written")


def _unsound(what: str) -> TliError:
    return TliError(
        f"the written output failed its check: {what}; nothing was kept. This is a bug in tli-recipe: "
        "please report it with the recipe"
    )
