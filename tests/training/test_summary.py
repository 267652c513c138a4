"""The closing line of a stage: validation loss at the start and the end, and a smoothed training loss."""

from __future__ import annotations

import pytest

from tli_recipe.training.finish import SMOOTHING_STEPS, loss_rows, loss_summary, summary_line
from tli_recipe.training.progress import first_step_line, postfix


def history(train: list[float], evals: dict[int, float]) -> list[dict]:
    """A Trainer log history: one training loss per step (from step 1), validation losses at some steps."""
    out = [{"eval_loss": loss, "step": step} for step, loss in evals.items() if step == 0]
    for step, loss in enumerate(train, start=1):
        out.append({"loss": loss, "learning_rate": 1e-4, "step": step, "epoch": step / len(train)})
        if step in evals:
            out.append({"eval_loss": evals[step], "step": step})
    return out


def test_the_summary_compares_validation_losses_and_smooths_the_training_loss():
    # The run: the last single step (2.9059) is above the first (2.5251) while validation improved.
    train = [2.5251, 3.9, 3.5, 3.3, 3.1, 3.0, 2.7, 3.2, 2.6, 2.8, 2.9, 2.5, 3.0, 2.9059]
    metrics = loss_summary(loss_rows(history(train, {0: 3.71, 10: 3.55})), final_eval_loss=3.48)
    mean = sum(train[-SMOOTHING_STEPS:]) / SMOOTHING_STEPS
    assert summary_line(metrics) == (
        f"validation loss 3.7100 -> 3.4800 (start -> end); training loss (smoothed over last 10 steps) {mean:.4f}"
    )
    assert metrics["train_loss_first"] == 2.5251 and metrics["train_loss_last"] == 2.9059


def test_the_summary_of_a_short_run_and_of_one_without_validation():
    few = loss_summary(loss_rows(history([4.0, 2.0, 3.0], {})), final_eval_loss=None)
    assert (
        summary_line(few)
        == "no validation loss (validation_fraction: 0); training loss (smoothed over last 3 steps) 3.0000"
    )
    late = loss_summary(loss_rows(history([4.0], {})), final_eval_loss=2.5)
    assert summary_line(late).startswith("validation loss 2.5000 at the end; ")


@pytest.mark.parametrize(
    ("step", "seconds", "first", "total", "line"),
    [
        (1, 2.34, 0, 10, "step 1 took 2.3 s; 10 steps -> about 23 s"),
        (1, 0.0123, 0, 200, "step 1 took 0.01 s; 200 steps -> about 2.5 s"),
        (1, 1032.0, 0, 10, "step 1 took 17 min; 10 steps -> about 2.9 h"),
        (5, 60.0, 4, 10, "step 5 took 60 s; the 6 steps left of 10 -> about 6 min"),
    ],
)
def test_the_first_step_line(step, seconds, first, total, line):
    assert first_step_line(step, seconds, first, total) == line


def test_the_bar_shows_loss_learning_rate_and_tokens_per_second():
    assert postfix({"loss": 2.51234, "learning_rate": 0.0001, "grad_norm": 1.0}, 1234.5) == {
        "loss": "2.5123",
        "lr": "1.00e-04",
        "tokens/s": "1,234",
    }
    assert postfix({"eval_loss": 3.0}, None) == {}
