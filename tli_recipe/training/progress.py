"""Training progress that says what it measures.

The Trainer's own bars are unlabelled, so a long initial evaluation looks like training, and it prints
its raw log dicts between them. Here each bar names the stage and the phase (the validation loss before
training, training, the periodic and the final validation); the training bar carries the last loss,
learning rate and tokens per second instead of the dicts; and after the first optimizer step of a run one
line says how long it took and what the whole run will take at that pace (a long sequence on a CPU can
take minutes per step).
"""

from __future__ import annotations

import time
from typing import Callable, Optional


def human_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def first_step_line(step: int, seconds: float, first: int, total: int) -> str:
    """``step 1 took 2.3 s; 10 steps -> about 23 s``: the first optimizer step of a run (``step``, the
    run started after step ``first``, 0 unless it resumed) and the steps of the stage (``total``)."""
    left = total - first
    steps = f"{total} steps" if first == 0 else f"the {left} steps left of {total}"
    return f"step {step} took {human_duration(seconds)}; {steps} -> about {human_duration(seconds * left)}"


def step_clock(stage: str, say: Callable[[str], None]):
    """A TrainerCallback timing the optimizer steps (not the evaluations between them): the line of
    :func:`first_step_line` after the run's first step, and ``seconds``/``steps`` for a rate."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.started: Optional[float] = None
            self.first: Optional[int] = None  # global step when this run began (a resumed run: > 0)
            self.seconds = 0.0
            self.steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first is None:
                self.first = state.global_step
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is None:
                return
            took = time.perf_counter() - self.started
            self.started = None
            self.seconds += took
            self.steps += 1
            if self.steps == 1 and state.is_world_process_zero and state.max_steps > 0:
                say(f"stage '{stage}': " + first_step_line(state.global_step, took, self.first or 0, state.max_steps))

    return StepClock()


def postfix(logs: dict, tokens_per_second: Optional[float]) -> dict[str, str]:
    """The training bar's postfix from one Trainer log: loss, learning rate, tokens/s (those known)."""
    out = {}
    if isinstance(logs.get("loss"), (int, float)):
        out["loss"] = f"{logs['loss']:.4f}"
    if isinstance(logs.get("learning_rate"), (int, float)):
        out["lr"] = f"{logs['learning_rate']:.2e}"
    if tokens_per_second:
        out["tokens/s"] = f"{tokens_per_second:,.0f}"
    return out


def labelled_progress(stage: str, clock=None, sequence_length: Optional[int] = None):
    """A ProgressCallback whose bars read ``stage 'NAME': training`` / ``...: validation before training``,
    with loss, learning rate and tokens/s (from ``clock``, a :func:`step_clock`) on the training bar."""
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    class LabelledProgress(ProgressCallback):
        def __init__(self) -> None:
            super().__init__()
            self.trained = False
            self.shown: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step = 0

        def on_step_begin(self, args, state, control, **kwargs):
            # Drawn at the first step, after the step-0 validation (eval_on_start) that train() runs first.
            if state.is_world_process_zero and self.training_bar is None:
                self.training_bar = tqdm(
                    total=state.max_steps,
                    initial=state.global_step,
                    dynamic_ncols=True,
                    desc=f"stage '{stage}': training",
                )
                self.current_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            # On the bar, not printed: the Trainer's dicts (numbers as quoted strings) broke it up.
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            rate = None
            if clock is not None and clock.seconds > 0 and sequence_length:
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                rate = per_step * sequence_length * clock.steps / clock.seconds
            self.shown.update(postfix(logs, rate))
            if "eval_loss" in logs:
                self.shown["validation"] = f"{logs['eval_loss']:.4f}"
            self.training_bar.set_postfix(self.shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)
            self.trained = True

        def phase(self, state) -> str:
            if self.trained:
                return "final validation"
            # eval_on_start: the step-0 validation runs inside train(), before the first step
            return "validation" if state.global_step > 0 else "validation before training"

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if state.is_world_process_zero and has_length(eval_dataloader):
                if self.prediction_bar is None:
                    self.prediction_bar = tqdm(
                        total=len(eval_dataloader),
                        leave=self.training_bar is None,
                        dynamic_ncols=True,
                        desc=f"stage '{stage}': {self.phase(state)}",
                    )
                self.prediction_bar.update(1)

    return LabelledProgress()


def above_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` writing above the progress bars (cleared and redrawn), not through them."""
    from tqdm.auto import tqdm

    def say(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    return say
