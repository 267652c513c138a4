"""Hostile cases for the output directory: never lose a user's data, never leave work files behind.

Each case goes through the harness (``refused``, ``snapshot``, ``leftovers``). Runs that must
be interrupted for real (two concurrent runs, SIGTERM, SIGKILL) use a subprocess that pauses
at a planned tensor until the test lets it go, so the timing is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tli_recipe.execute.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[2]

#: Runs the CLI with a pause before the 4th tensor: writes READY, then waits until GO exists.
PAUSING = textwrap.dedent("""
    import os, sys, time
    from tli_recipe.execute import shards
    ready, go = sys.argv[1], sys.argv[2]
    real = shards.ShardWriter._next
    def paused(self, name):
        if self._pos == 3:
            open(ready, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(self, name)
    shards.ShardWriter._next = paused
    from tli_recipe.cli import main
    main(sys.argv[3:], prog_name="tli-recipe")
""")


class Paused:
    """A `tli-recipe run` in a subprocess, stopped in the middle of writing its shards."""

    def __init__(self, tmp_path: Path, *args) -> None:
        script = tmp_path / "pausing.py"
        script.write_text(PAUSING)
        self.ready, self.go = tmp_path / "ready", tmp_path / "go"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.ready), str(self.go), *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=5)
                pytest.fail(f"the paused run never reached its pause (exit {self.proc.returncode}):\n{out}{err}")
            time.sleep(0.01)

    def finish(self, sig=None) -> tuple[int, str]:
        if sig is None:
            self.go.touch()
        else:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out + err


def recipe_for(tmp_path: Path, base: Path, out: Path, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base_model: {base}\noutput: {out}\ninject: {{every: 2}}\n")
    return path


def run(cli, recipe: Path, *extra):
    return cli("run", recipe, "--no-progress", "--device", "cpu", *extra)


@pytest.fixture
def earlier(tmp_path, tiny, hostile_cli):
    """(base, recipe, out): ``out`` holds a genuine earlier output of ``recipe``."""
    base = tiny(layers=4)
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, base, out)
    assert run(hostile_cli, recipe).exit_code == 0
    return base, recipe, out


# --- the lock -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_to_the_same_output_is_refused_while_the_first_writes(
    tmp_path, tiny, hostile_cli, refused, snapshot, leftovers
):
    base = tiny(layers=4)
    out = tmp_path / "out"
    first = Paused(tmp_path, "run", recipe_for(tmp_path, base, out), "--no-progress", "--device", "cpu")
    inputs = snapshot(base)
    second = run(hostile_cli, recipe_for(tmp_path, tiny(layers=8), out, "other.yaml"))
    refused(second, f"is being written by another tli-recipe run (pid {first.proc.pid},", inputs=inputs)
    status, text = first.finish()
    assert status == 0, text
    # The first run's output is in place, untouched by the second: 4 layers grow to 6.
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert leftovers(out) == []


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_message(tmp_path, tiny, hostile_cli, leftovers):
    base = tiny(layers=4)
    out = tmp_path / "out"
    pid = dead_pid()
    (tmp_path / ".out.lock").write_text(f"{pid}\n")
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    assert result.exit_code == 0, result.output
    assert f"took over the lock of an earlier run that did not finish (pid {pid})" in result.stderr
    assert (out / "tli-recipe.json").is_file() and leftovers(out) == []


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, tiny, hostile_cli, refused, snapshot):
    base = tiny(layers=4)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "key").write_text("secret")
    (tmp_path / ".out.lock").symlink_to(precious / "key")
    inputs = snapshot(base, precious)
    result = run(hostile_cli, recipe_for(tmp_path, base, tmp_path / "out"))
    refused(result, ".out.lock is a symbolic link, not a tli-recipe lock file; remove it", inputs=inputs)
    assert not (tmp_path / "out").exists()


# --- the re-check right before the swap ---------------------------------------------------------


def user_dir_during_run(monkeypatch, out: Path, files: dict[str, bytes]):
    """Make the user create ``out`` (with ``files``) while the run is writing its shards."""
    real = ShardWriter.close

    def close_and_meddle(self, *args):
        if out.exists():  # the user moves the earlier output away and makes their own folder there
            out.rename(out.with_name("moved-away-by-the-user"))
        out.mkdir()
        for name, data in files.items():
            (out / name).write_bytes(data)
        return real(self, *args)

    monkeypatch.setattr(ShardWriter, "close", close_and_meddle)


def test_a_directory_the_user_creates_during_a_run_survives(
    tmp_path, tiny, hostile_cli, refused, snapshot, monkeypatch
):
    base = tiny(layers=4)
    out = tmp_path / "out"
    user_dir_during_run(monkeypatch, out, {"thesis.tex": b"years of work"})
    inputs = snapshot(base)
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    refused(
        result,
        f"output {out} appeared while this run was writing and already exists; it was left as it is "
        "and nothing was written",
        inputs=inputs,
        target=out,
    )
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_bytes() == b"years of work"


def test_with_force_a_user_directory_swapped_in_during_the_run_survives(
    earlier, hostile_cli, refused, snapshot, monkeypatch
):
    base, recipe, out = earlier
    user_dir_during_run(monkeypatch, out, {"plan.json": b"{}", "notes.txt": b"mine"})
    inputs = snapshot(base)
    result = run(hostile_cli, recipe, "--force")
    refused(
        result,
        re.compile(
            r"appeared while this run was writing and is not a tli-recipe output \(no "
            r"tli-recipe\.json\); it was left as it is"
        ),
        inputs=inputs,
        target=out,
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plan.json"]
    assert (out / "notes.txt").read_bytes() == b"mine"


# --- what --force accepts -----------------------------------------------------------------------


def test_force_replaces_a_genuine_earlier_output(earlier, hostile_cli, leftovers):
    base, recipe, out = earlier
    (out / "config.json").write_text((out / "config.json").read_text())  # rewritten, same bytes: still ours
    result = run(hostile_cli, recipe, "--force")
    assert result.exit_code == 0, result.output
    assert leftovers(out) == []


def test_force_refuses_a_directory_with_only_a_users_plan_json(tmp_path, tiny, hostile_cli, refused, snapshot):
    base = tiny(layers=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text('{"my": "plan"}\n')
    inputs = snapshot(base, out)
    result = run(hostile_cli, recipe_for(tmp_path, base, out), "--force")
    refused(
        result,
        f"output {out} is not a tli-recipe output (no tli-recipe.json); --force replaces only an earlier "
        "tli-recipe output",
        inputs=inputs,
        target=out,
    )


def test_force_refuses_an_output_holding_files_the_tool_did_not_write(earlier, hostile_cli, refused, snapshot):
    base, recipe, out = earlier
    for name in ("notes.txt", "eval.csv", "b.txt", "c.txt"):
        (out / name).write_text("mine\n")
    inputs = snapshot(base, out)
    result = run(hostile_cli, recipe, "--force")
    refused(
        result, "it holds files tli-recipe did not write: b.txt, c.txt, eval.csv and 1 more", inputs=inputs, target=out
    )


def test_force_refuses_an_output_whose_file_was_edited_in_place(earlier, hostile_cli, refused, snapshot):
    base, recipe, out = earlier
    config = out / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"silu"', '"gelu"'))  # same length: only the hash shows the edit
    assert config.stat().st_size == len(text)
    inputs = snapshot(base, out)
    refused(
        run(hostile_cli, recipe, "--force"),
        "files changed since tli-recipe wrote them: config.json",
        inputs=inputs,
        target=out,
    )


def test_force_refuses_a_manifest_that_does_not_match_the_shards(earlier, hostile_cli, refused, snapshot):
    base, recipe, out = earlier
    manifest = json.loads((out / "tli-recipe.json").read_text())
    manifest["recipe_sha256"] = "0" * 64
    (out / "tli-recipe.json").write_text(json.dumps(manifest))
    inputs = snapshot(base, out)
    refused(
        run(hostile_cli, recipe, "--force"),
        "tli-recipe.json does not match the recipe_sha256 in the metadata of model-00001-of-00001.safetensors",
        inputs=inputs,
        target=out,
    )


@pytest.mark.parametrize(
    "manifest",
    [
        '{"tool": "tli-recipe"}',
        "[1, 2]",
        "not json",
        '{"tool": "tli-recipe", "format": 1, "recipe_sha256": "../../etc", "files": {}}',
    ],
)
def test_force_refuses_a_forged_or_foreign_manifest(tmp_path, tiny, hostile_cli, refused, snapshot, manifest):
    base = tiny(layers=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tli-recipe.json").write_text(manifest)
    inputs = snapshot(base, out)
    refused(
        run(hostile_cli, recipe_for(tmp_path, base, out), "--force"),
        "tli-recipe.json is not a tli-recipe manifest",
        inputs=inputs,
        target=out,
    )


def test_force_refuses_an_output_holding_a_symlink(earlier, hostile_cli, refused, snapshot, tmp_path):
    base, recipe, out = earlier
    (tmp_path / "elsewhere").write_text("keep")
    (out / "link").symlink_to(tmp_path / "elsewhere")
    inputs = snapshot(base, out)
    refused(
        run(hostile_cli, recipe, "--force"), "it holds files tli-recipe did not write: link", inputs=inputs, target=out
    )
    assert (tmp_path / "elsewhere").read_text() == "keep"


# --- failure paths: the temporary folder always goes --------------------------------------------


def test_a_failed_final_rename_restores_the_previous_output(earlier, hostile_cli, refused, snapshot, monkeypatch):
    from tli_recipe.execute import output

    base, recipe, out = earlier
    real = output.rename_noreplace  # the final rename (the move aside is os.rename)

    def failing(src, dst, *a, **k):
        if ".tmp-" in Path(src).name and Path(dst) == out:
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(output, "rename_noreplace", failing)
    previous = snapshot(out, base)
    refused(run(hostile_cli, recipe, "--force"), f"error: {out}: Input/output error", inputs=previous, target=out)


@pytest.fixture
def small_fs(tmp_path):
    """A 128 KiB tmpfs (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_cleanly_and_gives_the_space_back(small_fs, tiny, hostile_cli, refused, snapshot, tmp_path):
    base = tiny(layers=8)
    out = small_fs / "out"
    before = os.statvfs(small_fs)
    inputs = snapshot(base)
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    refused(result, f"output {out}: no space left on the file system", inputs=inputs, target=out)
    assert "nothing was written and the partial output was removed" in result.stderr
    assert list(small_fs.iterdir()) == []
    after = os.statvfs(small_fs)
    assert (after.f_bfree, after.f_ffree) == (before.f_bfree, before.f_ffree)


@pytest.mark.slow
def test_sigterm_mid_run_leaves_the_previous_output_and_no_temporary_folder(earlier, refused, snapshot):
    base, recipe, out = earlier
    previous = snapshot(out, base)
    paused = Paused(out.parent, "run", recipe, "--no-progress", "--device", "cpu", "--force")
    assert [p.name for p in out.parent.glob(".out.tmp-*")]  # it was writing beside the target
    status, text = paused.finish(signal.SIGTERM)
    result = SimpleNamespace(exit_code=status, stdout=text, stderr="")
    refused(result, "interrupted: nothing was written", status=130, inputs=previous, target=out)


@pytest.mark.slow
def test_after_sigkill_the_next_run_removes_the_dead_runs_temporary_folder(
    tmp_path, tiny, hostile_cli, snapshot, leftovers
):
    base = tiny(layers=4)
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, base, out)
    paused = Paused(tmp_path, "run", recipe, "--no-progress", "--device", "cpu")
    status, _ = paused.finish(signal.SIGKILL)
    assert status == -signal.SIGKILL
    stale = [p.name for p in tmp_path.glob(".out.tmp-*")]
    assert len(stale) == 1 and (tmp_path / ".out.lock").is_file()
    # Folders the tool did not make, or made by a run that is still alive, are never touched.
    mine = tmp_path / ".out.tmp-mine"
    mine.mkdir()
    (mine / "data").write_text("mine")
    alive = tmp_path / ".out.tmp-alive"
    alive.mkdir()
    (alive / ".tli-recipe-run").write_text(
        json.dumps({"tool": "tli-recipe", "pid": os.getppid(), "target": "out", "host": socket.gethostname()})
    )
    kept = snapshot(mine, alive)
    result = run(hostile_cli, recipe)
    assert result.exit_code == 0, result.output
    assert (
        f"removed {tmp_path / stale[0]}: the temporary folder of an earlier run on {out} that did not finish "
        f"(pid {paused.proc.pid})" in result.stderr
    )
    assert f"took over the lock of an earlier run that did not finish (pid {paused.proc.pid})" in result.stderr
    kept.unchanged()
    assert leftovers(out) == [".out.tmp-alive", ".out.tmp-mine"]


# --- render -o ----------------------------------------------------------------------------------


def test_render_refuses_to_overwrite_a_recipe_unless_forced(tmp_path, hostile_cli, refused, snapshot):
    template = tmp_path / "t.yaml.j2"
    template.write_text(
        "---\nvariables:\n  every: {type: int, default: 4}\n---\n"
        "base_model: /nonexistent/model\ninject: {every: {{ every }}}\n"
    )
    folder = tmp_path / "recipes"
    folder.mkdir()
    target = folder / "mine.yaml"
    target.write_text("base_model: my/hand-tuned\n")
    inputs = snapshot(folder)
    refused(
        hostile_cli("render", template, "-o", target),
        f"{target} exists and differs from the rendering; nothing was written; pass --force",
        inputs=inputs,
        target=target,
    )
    forced = hostile_cli("render", template, "-o", target, "--force")
    assert forced.exit_code == 0 and "inject: {every: 4}" in target.read_text()
    again = hostile_cli("render", template, "-o", target)  # the same text again: nothing to refuse
    assert again.exit_code == 0 and "unchanged" in again.stderr


# --- a run killed in the middle of its swap -----------------------------------------------------


def dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_a_previous_output_left_aside_by_a_killed_swap_is_restored(earlier, hostile_cli, refused, snapshot):
    base, recipe, out = earlier
    aside = out.with_name(".out.old-abc123")
    before = snapshot(out)
    out.rename(aside)  # the state after a SIGKILL between the two renames of a --force run
    pid = dead_pid()
    out.with_name(".out.lock").write_text(f"{pid}\ntmp .out.tmp-gone\naside .out.old-abc123\n")
    result = run(hostile_cli, recipe)
    refused(result, f"output {out} already exists; pass --force", target=out)
    assert f"restored {out} from {aside}: an earlier run (pid {pid}) was stopped while replacing it" in result.stderr
    before.unchanged()


def test_a_previous_output_a_killed_swap_did_not_remove_goes_with_a_message(earlier, hostile_cli, leftovers, tmp_path):
    base, recipe, out = earlier
    aside = out.with_name(".out.old-abc123")
    shutil.copytree(out, aside)  # the swap finished; removing the replaced output did not
    pid = dead_pid()
    out.with_name(".out.lock").write_text(f"{pid}\naside .out.old-abc123\n")
    result = run(hostile_cli, recipe, "--force")
    assert result.exit_code == 0, result.output
    assert f"removed {aside}: the previous output it had replaced of an earlier run on {out}" in result.stderr
    assert leftovers(out) == []


def test_lock_notes_naming_other_folders_are_ignored(tmp_path, tiny, hostile_cli, snapshot):
    base = tiny(layers=4)
    out = tmp_path / "out"
    precious = tmp_path / "precious"
    mine = tmp_path / ".out.tmp-mine"  # named like ours, but no marker of this tool in it
    for folder in (precious, mine):
        folder.mkdir()
        (folder / "data").write_text("mine")
    kept = snapshot(precious, mine)
    (tmp_path / ".out.lock").write_text(f"{dead_pid()}\ntmp .out.tmp-mine\naside precious\n")
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    assert result.exit_code == 0, result.output
    kept.unchanged()
    assert "removed" not in result.stderr and "restored" not in result.stderr


def test_an_empty_folder_created_right_before_the_rename_is_not_swallowed(
    tmp_path, tiny, hostile_cli, refused, snapshot, monkeypatch
):
    """``os.rename`` replaces an empty directory: the last step must not (renameat2 RENAME_NOREPLACE)."""
    from tli_recipe.execute import output

    base = tiny(layers=4)
    out = tmp_path / "out"
    real = output.check_target

    def check_then_user_mkdir(target, force, appeared=False):
        exists = real(target, force, appeared)
        if appeared:  # after the last check, before the rename
            out.mkdir()
        return exists

    monkeypatch.setattr(output, "check_target", check_then_user_mkdir)
    inputs = snapshot(base)
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    refused(
        result, f"output {out} appeared while this run was writing; it was left as it is", inputs=inputs, target=out
    )
    assert list(out.iterdir()) == []


# --- a full disk names the path, and leaves no lock --------------------------------------------------


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte (and inode, as far as a few files go)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_disk_full_before_the_run_names_the_output_and_leaves_no_lock(
    small_fs, tiny, hostile_cli, refused, snapshot, tmp_path
):
    base = tiny(layers=4)
    out = small_fs / "out"
    fill(small_fs)
    inputs = snapshot(base)
    result = run(hostile_cli, recipe_for(tmp_path, base, out))
    refused(result, f"output {out}: no space left on the file system of {small_fs}", inputs=inputs, target=out)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_a_lock_whose_first_note_fails_is_removed(tmp_path, tiny, hostile_cli, refused, monkeypatch, leftovers):
    """The note (the pid) is written right after the lock is taken: a full disk there used to leave the lock."""
    import errno

    from tli_recipe.execute.lock import TargetLock

    def full(self, **notes):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TargetLock, "note", full)
    out = tmp_path / "out"
    result = run(hostile_cli, recipe_for(tmp_path, tiny(layers=4), out))
    refused(result, f"output {out}: no space left on the file system of {tmp_path}", target=out)
    assert leftovers(out) == []


def test_render_to_a_full_disk_names_the_file(small_fs, hostile_cli, refused, tmp_path):
    template = tmp_path / "t.yaml.j2"
    template.write_text("---\nvariables:\n  base: {type: str, default: org/model}\n---\nbase_model: {{ base }}\n")
    fill(small_fs)
    target = small_fs / "recipe.yaml"
    refused(hostile_cli("render", template, "--output", target), f"error: {target}: No space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_missing_parents_of_an_output_are_created_and_said(tmp_path, tiny, hostile_cli):
    out = tmp_path / "new" / "deeper" / "out"
    result = run(hostile_cli, recipe_for(tmp_path, tiny(layers=4), out))
    assert result.exit_code == 0, result.output
    assert f"created {tmp_path / 'new'} and 1 folder inside it (it did not exist)" in result.stderr
    again = run(hostile_cli, recipe_for(tmp_path, tiny(layers=4), tmp_path / "new" / "deeper" / "out2"))
    assert again.exit_code == 0 and "(it did not exist)" not in again.stderr
