"""Output shards: equal parts so the copy lanes write different files side by side."""

from __future__ import annotations

import threading

import pytest
import torch
from growing import grow, load_all
from safetensors.torch import save_file

from tli_recipe.execute import shards
from tli_recipe.execute.shards import PARALLEL_MIN_BYTES, ShardWriter, layout_shards
from tli_recipe.source.checkpoint import nbytes, read_tensors

MiB = 2**20


def sizes(layout) -> list[int]:
    return [sum(nbytes(code, shape) for _, code, shape in spec.tensors) for spec in layout]


def f32(name: str, mib: float) -> tuple[str, str, tuple[int, ...]]:
    return (name, "F32", (int(mib * MiB) // 4,))


def test_a_small_output_is_one_shard_when_it_fits():
    layout = layout_shards([f32(f"t{i}", 10) for i in range(20)], 5 * 10**9)
    assert [s.file for s in layout] == ["model-00001-of-00001.safetensors"]


def test_a_large_output_is_split_into_equal_parts_one_per_copy_thread():
    tensors = [f32(f"t{i}", 64) for i in range(17)] + [f32("last", 16)]  # 1.08 GiB
    layout = layout_shards(tensors, 5 * 10**9, parts=2)
    assert [s.file for s in layout] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [name for s in layout for name, _, _ in s.tensors] == [t[0] for t in tensors]  # order kept
    a, b = sizes(layout)
    assert abs(a - b) <= 64 * MiB  # within one tensor of equal


def test_the_shard_count_is_rounded_up_to_a_multiple_of_the_copy_threads():
    tensors = [f32(f"t{i}", 100) for i in range(30)]  # 2.93 GiB with 1.1 GB shards: 3 needed, 4 made
    layout = layout_shards(tensors, 1_100_000_000, parts=2)
    assert len(layout) == 4 and all(n <= 1_100_000_000 for n in sizes(layout))
    assert max(sizes(layout)) - min(sizes(layout)) <= 100 * MiB


def test_below_the_threshold_the_fewest_shards_are_made():
    tensors = [f32(f"t{i}", 10) for i in range(30)]  # 300 MiB in 100 MiB shards
    layout = layout_shards(tensors, 100 * MiB, parts=2)
    assert len(layout) == 3 and sizes(layout) == [100 * MiB] * 3
    assert sum(sizes(layout)) < PARALLEL_MIN_BYTES


def test_equal_parts_that_would_overflow_a_shard_fall_back_to_filling_in_turn():
    # Equal halves would be 600 + 600, but a 400 MiB tensor in the middle makes one half 800 > 700.
    tensors = [f32("a", 400), f32("b", 200), f32("c", 400), f32("d", 200)]
    layout = layout_shards(tensors, 700 * MiB, parts=1)
    assert all(n <= 700 * MiB for n in sizes(layout))
    assert [name for s in layout for name, _, _ in s.tensors] == ["a", "b", "c", "d"]


def test_a_tensor_larger_than_a_shard_gets_its_own():
    layout = layout_shards([f32("small", 1), f32("huge", 300), f32("tail", 1)], 100 * MiB, parts=1)
    assert [[n for n, _, _ in s.tensors] for s in layout] == [["small"], ["huge"], ["tail"]]


@pytest.fixture
def two_lane_output(monkeypatch, tmp_path, tiny):
    """A grown tiny model forced into several shards, recording which lane copied into which file."""
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 1)
    seen: list[tuple[str, int]] = []
    real = shards.copy_range

    def recording(info, dst, offset):
        seen.append((threading.current_thread().name, dst))
        return real(info, dst, offset)

    monkeypatch.setattr(shards, "copy_range", recording)
    base = tiny(layers=4)
    plan, out = grow(tmp_path, base, "inject: {every: 2}\n")
    return base, out, seen


def test_each_shard_is_copied_by_one_lane_and_the_lanes_alternate(two_lane_output):
    base, out, seen = two_lane_output
    assert len(list(out.glob("model-*.safetensors"))) == 2
    lanes_of_file: dict[int, set[str]] = {}
    for lane, fd in seen:
        lanes_of_file.setdefault(fd, set()).add(lane)
    assert all(len(lanes) == 1 for lanes in lanes_of_file.values())
    assert {lane for lanes in lanes_of_file.values() for lane in lanes} == {"tli-recipe-copy0_0", "tli-recipe-copy1_0"}


def test_the_two_lane_output_holds_the_same_tensors_as_one_shard(two_lane_output, tmp_path, tiny, monkeypatch):
    base, out, _ = two_lane_output
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 1 << 62)
    _, single = grow(tmp_path, base, "inject: {every: 2}\n", name="single")
    assert len(list(single.glob("model-*.safetensors"))) == 1
    got, expected = load_all(out), load_all(single)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_copy_that_fails_in_a_lane_fails_the_writer_and_stops_every_lane(tmp_path, monkeypatch):
    source = tmp_path / "src.safetensors"
    save_file({f"t{i}": torch.full((256,), float(i)) for i in range(6)}, source)
    infos, _ = read_tensors(source)
    layout = layout_shards([(n, "F32", (256,)) for n in sorted(infos)], 3 * 1024, parts=2)
    assert len(layout) == 2
    real = shards.copy_range

    def failing(info, dst, offset):
        if info.name == "t4":
            raise OSError(28, "No space left on device")
        return real(info, dst, offset)

    monkeypatch.setattr(shards, "copy_range", failing)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"}, copy_threads=2)
    with pytest.raises(OSError, match="No space left"):  # at the next tensor once noted, else at close
        for name in sorted(infos):
            writer.copy(name, infos[name])
        writer.close()
    writer.abort()
    assert not any(t.name.startswith("tli-recipe-copy") for t in threading.enumerate())


def test_a_failed_copy_stops_the_writer_at_the_next_tensor(tmp_path, monkeypatch):
    source = tmp_path / "src.safetensors"
    save_file({f"t{i}": torch.full((256,), float(i)) for i in range(3)}, source)
    infos, _ = read_tensors(source)
    layout = layout_shards([(n, "F32", (256,)) for n in sorted(infos)], 1 << 20)

    def failing(info, dst, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shards, "copy_range", failing)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"})
    writer.copy("t0", infos["t0"])
    writer._futures[-1].exception(timeout=5)  # the lane has run (and failed) the copy
    threading.Event().wait(0.05)  # and its done-callback has noted it
    with pytest.raises(OSError, match="Input/output error"):
        writer.copy("t1", infos["t1"])
    writer.abort()


def test_the_writer_keeps_a_bounded_number_of_shards_open_while_lanes_copy(tmp_path, monkeypatch):
    source = tmp_path / "src.safetensors"
    save_file({f"t{i:02d}": torch.full((256,), float(i)) for i in range(24)}, source)
    infos, _ = read_tensors(source)
    layout = layout_shards([(n, "F32", (256,)) for n in sorted(infos)], 1024, parts=2)  # one tensor a shard
    monkeypatch.setattr(shards, "_OPEN_SHARDS_PER_LANE", 1)
    gate = threading.Event()
    real = shards.copy_range

    def slow(info, dst, offset):
        gate.wait(0.02)  # the lanes lag behind the writer
        return real(info, dst, offset)

    monkeypatch.setattr(shards, "copy_range", slow)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"}, copy_threads=2)
    most_open = 0
    for name in sorted(infos):
        writer.copy(name, infos[name])
        most_open = max(most_open, sum(not f.closed for f in writer._files))
    writer.close()
    assert len(layout) == 24 and most_open <= 1 * 2 + 2  # per lane, plus the open one and one finishing
    assert all(f.closed for f in writer._files)
    assert read_tensors(tmp_path / layout[-1].file)[0]["t23"].nbytes == 1024


def test_a_computed_tensor_that_fails_to_write_fails_the_writer(tmp_path, monkeypatch):
    layout = layout_shards([(f"t{i}", "F32", (256,)) for i in range(4)], 1 << 20)

    def failing(dst, view, offset, keep=None):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shards, "write_at", failing)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"})
    with pytest.raises(OSError, match="Input/output error"):
        for i in range(4):  # the second write waits for the first, whose failure stops it
            writer.write(f"t{i}", torch.zeros(256))
        writer.close()
    writer.abort()


def test_computed_tensors_written_in_lanes_read_back_exactly(tmp_path):
    values = {f"t{i}": torch.randn(1000 + i, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    layout = layout_shards([(n, "F32", tuple(v.shape)) for n, v in values.items()], 12_000, parts=2)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"})
    for name, value in values.items():
        writer.write(name, value)
    writer.close()
    got = load_all(tmp_path)
    assert len(layout) > 1 and sorted(got) == sorted(values)
    assert all(torch.equal(got[n], v) for n, v in values.items())


@pytest.mark.parametrize("empty_between", [False, True])
def test_output_buffers_are_not_reused_while_their_write_runs(tmp_path, monkeypatch, empty_between):
    """Each tensor is computed into writer.buffer() while the previous one is written: a slow write
    must never see its bytes overwritten by the next tensor."""
    names = [f"t{i}" for i in range(6)]
    specs = []
    for _i, name in enumerate(names):
        specs.append((name, "F32", (4096,)))
        if empty_between:
            specs.append((f"{name}.empty", "F32", (0,)))
    layout = layout_shards(specs, 1 << 20)
    real = shards.write_at

    def slow(dst, view, offset, keep=None):
        threading.Event().wait(0.03)
        return real(dst, view, offset, keep)

    monkeypatch.setattr(shards, "write_at", slow)
    writer = ShardWriter(tmp_path, layout, {"format": "pt"})
    for name, code, shape in specs:
        out = writer.buffer(code, shape)
        out.fill_(float(names.index(name)) if name in names else 0.0)
        writer.write(name, out)
    writer.close()
    got = load_all(tmp_path)
    assert all(torch.equal(got[n], torch.full((4096,), float(i))) for i, n in enumerate(names))


def test_a_reusing_reader_keeps_its_two_slots_apart(tmp_path):
    from tli_recipe.execute.shards import TensorReader

    source = tmp_path / "src.safetensors"
    save_file({"a": torch.arange(300, dtype=torch.float32), "b": -torch.arange(200, dtype=torch.float32)}, source)
    infos, _ = read_tensors(source)
    reader = TensorReader(reuse=True)
    a = reader.read(infos["a"])
    b = reader.read(infos["b"], slot=1)
    assert torch.equal(a, torch.arange(300, dtype=torch.float32)) and torch.equal(
        b, -torch.arange(200, dtype=torch.float32)
    )
    again = reader.read(infos["b"])  # slot 0 again: a's buffer, now b's values
    assert again.data_ptr() == a.data_ptr() and torch.equal(again, b)
    reader.close()


def test_a_computed_value_of_the_wrong_shape_is_refused_not_broadcast(tmp_path):
    from tli_recipe.errors import TliError
    from tli_recipe.execute import executor
    from tli_recipe.execute.shards import TensorReader
    from tli_recipe.plan.model import TensorOp

    op = TensorOp(name="w", source="s", source_name="w", op="lesa", shape=(4, 3), dtype="F32", source_dtype="F32")
    writer = ShardWriter(tmp_path, layout_shards([("w", "F32", (4, 3))], 1 << 20), {"format": "pt"})
    for wrong in (torch.arange(3, dtype=torch.float32), torch.zeros(5, 3)):
        with pytest.raises(
            TliError, match=r"tensor 'w': got shape \((3|5, 3),?\) torch.float32, the plan says \(4, 3\) F32"
        ):
            executor.make_tensor(
                op, TensorReader(reuse=True), None, "cpu", {}, {"w": wrong}, out=writer.buffer("F32", (4, 3))
            )
    writer.abort()
