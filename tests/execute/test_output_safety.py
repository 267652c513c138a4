"""The output lifecycle on its own: lock, staged folder, manifest, swap with rollback, quiet cleanup."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from tli_recipe.errors import TliError
from tli_recipe.execute import output
from tli_recipe.execute.lock import TargetLock, lock_path
from tli_recipe.execute.manifest import MANIFEST, output_problem, write_manifest
from tli_recipe.execute.output import (
    RUN_MARKER,
    check_target,
    remove_quietly,
    remove_stale_runs,
    staged_output,
    swap_into_place,
)

SHA = "ab" * 32


def beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_a_staged_output_becomes_the_target_with_a_manifest_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    with staged_output(target, force=False, recipe_sha256=SHA, log=lambda m: None) as tmp:
        assert lock_path(target).read_text() == f"{os.getpid()}\ntmp {tmp.name}\n"
        assert (tmp / RUN_MARKER).is_file() and not target.exists()
        (tmp / "config.json").write_text("{}")
        (tmp / "training").mkdir()
        (tmp / "training" / "a.yaml").write_text("lr: 1\n")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", MANIFEST, "training"]
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["recipe_sha256"] == SHA and sorted(manifest["files"]) == ["config.json", "training/a.yaml"]
    assert output_problem(target) is None and beside(target) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError, OSError])
def test_every_failure_removes_the_staged_folder_and_the_lock(tmp_path, interrupt):
    target = tmp_path / "out"
    with pytest.raises(interrupt):
        with staged_output(target, force=False, recipe_sha256=SHA, log=lambda m: None) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            raise interrupt("stop")
    assert list(tmp_path.iterdir()) == []


def test_cleanup_never_raises_and_the_real_error_is_the_one_reported(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "rmtree", broken)
    remove_quietly(tmp_path / "absent")  # no exception either
    with pytest.raises(RuntimeError, match="the real one"):
        with staged_output(tmp_path / "out", force=False, recipe_sha256=SHA, log=lambda m: None):
            raise RuntimeError("the real one")


def test_a_full_disk_during_the_run_becomes_a_clear_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(TliError, match="no space left on the file system .*nothing was written"):
        with staged_output(target, force=False, recipe_sha256=SHA, log=lambda m: None):
            raise OSError(28, "No space left on device", "shard")
    assert list(tmp_path.iterdir()) == []


def test_the_lock_refuses_a_second_holder_naming_the_pid_and_is_removed_on_release(tmp_path):
    target = tmp_path / "out"
    with TargetLock(target):
        with pytest.raises(TliError, match=f"being written by another tli-recipe run \\(pid {os.getpid()},"):
            with TargetLock(target):
                pass
    assert not lock_path(target).exists()
    with TargetLock(target):  # free again
        pass


def test_a_lock_file_with_garbage_is_taken_over_without_echoing_it(tmp_path):
    target = tmp_path / "out"
    lock_path(target).write_text("ref: /home/u/.ssh/id_ed25519\n")
    said = []
    with TargetLock(target, log=said.append):
        pass
    assert said == [] and not lock_path(target).exists()


def test_check_target_refuses_files_links_and_foreign_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for name in ("file", "link"):
        with pytest.raises(TliError, match="exists and is not a directory"):
            check_target(tmp_path / name, force=True)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", force=True)  # nothing in it can be lost
    with pytest.raises(TliError, match="already exists; pass --force"):
        check_target(tmp_path / "empty", force=False)
    check_target(tmp_path / "absent", force=False)


def test_a_manifest_is_deterministic_and_sees_files_added_later(tmp_path):
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        (folder / "README.md").write_text("card\n")
        write_manifest(folder, SHA)
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    (tmp_path / "a" / "notes\x1b[31m.txt").write_text("mine")
    assert output_problem(tmp_path / "a") == "it holds files tli-recipe did not write: notes\\x1b[31m.txt"


def test_swap_into_place_keeps_the_old_target_when_the_final_rename_fails(tmp_path, monkeypatch):
    target, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    target.mkdir()
    (target / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    from tli_recipe.execute import output

    real = output.rename_noreplace  # the final rename

    def failing(src, dst):
        if Path(src) == tmp:
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(output, "rename_noreplace", failing)
    with pytest.raises(OSError):
        swap_into_place(tmp, target)
    assert [p.name for p in target.iterdir()] == ["old"] and beside(target) == [".out.tmp-1"]
    monkeypatch.setattr(output, "rename_noreplace", real)
    swap_into_place(tmp, target)  # replace=True: old removed afterwards
    assert [p.name for p in target.iterdir()] == ["new"] and beside(target) == []


def test_stale_folders_of_other_targets_or_hosts_are_not_touched(tmp_path):
    target = tmp_path / "out"
    said = []
    for name, marker in {"other": {"target": "out2"}, "host": {"host": "elsewhere"}, "dead": {}}.items():
        folder = tmp_path / f".out.tmp-{name}"
        folder.mkdir()
        data = {"tool": "tli-recipe", "pid": 2**22 + 17, "host": socket.gethostname(), "target": "out", **marker}
        (folder / RUN_MARKER).write_text(json.dumps(data))
    if output.pid_alive(2**22 + 17):
        pytest.skip("the made-up pid is alive here")
    remove_stale_runs(target, said.append)
    assert beside(target) == [".out.tmp-host", ".out.tmp-other"]
    assert len(said) == 1 and ".out.tmp-dead" in said[0] and f"(pid {2**22 + 17})" in said[0]
