"""Ctrl-C and SIGTERM while training: the first Ctrl-C stops at the next step boundary with a checkpoint and
the resume note (exit 130), a second one ends the process at once, even inside a long call into C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_text

from tli_recipe.training.finish import check_resume, last_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(run: subprocess.Popen, marker: str) -> list[str]:
    seen = []
    for line in run.stderr:  # type: ignore[union-attr]
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} in:\n" + "".join(seen)[-3000:])


@pytest.mark.slow  # trains a tiny model in a subprocess
def test_first_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, cli):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt", 40)
    stage = (
        f"  - name: inj\n    trainable: [injected]\n    datasets: [{{path: {data}}}]\n    max_steps: 5000\n"
        "    sequence_length: 16\n    precision: float32\n    save_steps: 100000\n"
    )
    recipe = write_recipe(
        tmp_path, f"base_model: {base}\ninject: {{every: 2}}\noutput: {tmp_path / 'grown'}\nstages:\n{stage}"
    )
    assert cli("run", recipe, "--no-progress").exit_code == 0
    run = _spawn(["-m", "tli_recipe", "train", str(tmp_path / "grown"), "--no-progress"], tmp_path)
    seen = _read_until(run, "stage 'inj': step 1 took ")  # training: the line after the first step
    assert "; 5000 steps -> about " in seen[-1]
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    err = "".join(seen) + err
    assert run.returncode == 130, err[-3000:]
    assert "Ctrl-C: stopping at the end of this optimizer step" in err
    assert err.count("interrupted: Ctrl-C: stage 'inj' stopped after step ") == 1, err[-3000:]
    assert "run the same command again to resume" in err and out == ""
    # Saved although save_steps is far away, and the same command resumes from it.
    work = tmp_path / "grown-inj.partial"
    saved = last_checkpoint(work)
    assert saved is not None and 1 <= int(Path(saved).name.split("-")[1]) < 5000
    check_resume(Path(saved))
    assert not (tmp_path / "grown-inj").exists()


SCRIPT = """
import hashlib, sys
from tli_recipe.training.train import Preemption
with Preemption() as p:
    print("ready", file=sys.stderr, flush=True)
    # One long call into C that never returns to the interpreter, like a training step of a long sequence.
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)
print("not stopped", file=sys.stderr)
"""


def test_a_second_ctrl_c_ends_the_process_at_once_inside_a_long_step(tmp_path):
    run = _spawn(["-c", SCRIPT], tmp_path)
    seen = _read_until(run, "ready")
    run.send_signal(signal.SIGINT)
    seen += _read_until(run, "press Ctrl-C again to stop at once")  # said while the call still runs
    assert run.poll() is None  # the first Ctrl-C waits for the step boundary
    started = time.monotonic()
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=600)
    took = time.monotonic() - started
    err = "".join(seen) + err
    assert run.returncode == 130, err
    assert "interrupted: Ctrl-C again: stopped at once; the stage keeps its last saved checkpoint" in err
    assert took < 10 and "not stopped" not in err, (took, err)  # the call alone takes minutes


def test_sigterm_and_ctrl_c_request_a_stop_and_name_the_signal(monkeypatch):
    from tli_recipe.training.train import Preempted, Preemption

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    p = Preemption()
    p.received(signal.SIGTERM)
    assert p.requested and p.name == "SIGTERM" and Preempted("x", p.signum).exit_code == 143
    p.received(signal.SIGINT)  # a Ctrl-C after SIGTERM: still the first Ctrl-C, no exit
    assert exits == [] and p.name == "SIGTERM"
    p = Preemption()
    p.received(signal.SIGINT)
    assert p.requested and p.name == "Ctrl-C" and Preempted("x", p.signum).exit_code == 130 and exits == []
    p.received(signal.SIGINT)
    assert exits == [130]


def test_a_second_ctrl_c_removes_a_stage_folder_being_written(tmp_path, monkeypatch):
    """Stopping at once while a finished stage is written leaves no half-written `.NAME.tmp-*` folder; folders
    it is not writing stay."""
    from tli_recipe.training import finish
    from tli_recipe.training.train import Preemption

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    writing = tmp_path / ".new.tmp-abc"
    (writing / "sub").mkdir(parents=True)
    (writing / "sub" / "model.safetensors").write_bytes(b"half")
    other = tmp_path / "new"
    other.mkdir()
    monkeypatch.setattr(finish, "WRITING", {writing})
    p = Preemption()
    p.received(signal.SIGINT)
    assert writing.is_dir()  # the first Ctrl-C waits for the step boundary
    p.received(signal.SIGINT)
    assert exits == [130] and not writing.exists() and other.is_dir()


def test_the_handlers_are_restored_after_training():
    from tli_recipe.training.train import Preemption

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.set_wakeup_fd(-1))
    signal.set_wakeup_fd(before[2])
    with Preemption() as p:
        assert signal.getsignal(signal.SIGINT) == p._handle
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a request
        assert p.requested and p.name == "Ctrl-C"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.set_wakeup_fd(-1)) == before
    signal.set_wakeup_fd(before[2])


@pytest.mark.slow  # grows and trains a tiny model in a subprocess
def test_ctrl_c_stops_compare_at_a_step_boundary(tmp_path):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt", 40)
    stage = "stages:\n  - name: new\n    trainable: [injected]\n"
    recipe = write_recipe(tmp_path, f"name: tli\nbase_model: {base}\ninject: {{every: 2}}\n{stage}", "tli.yaml")
    args = ["-m", "tli_recipe", "compare", str(recipe), "--data", str(data), "--heldout", str(data)]
    args += ["--steps", "5000", "--sequence-length", "16", "--work", str(tmp_path / "cmp"), "--device", "cpu"]
    run = _spawn(args, tmp_path)
    seen = _read_until(run, "stage 'new': step 1 took ")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    err = "".join(seen) + err
    assert run.returncode == 130, err[-3000:]
    assert "interrupted: Ctrl-C: compare stopped while training tli (after step " in err, err[-3000:]
    assert "no tables were written; the same command starts over" in err and out == ""
    assert not (tmp_path / "cmp" / "compare.md").exists()
