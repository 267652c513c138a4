"""Progress bars of a training stage that say what they measure.

The Trainer's own bars are unlabelled, so a long initial evaluation looks like training. Here
each bar names the stage and the phase: the validation loss before training, training, the
periodic and the final validation.
"""

from __future__ import annotations


def labelled_progress(stage: str):
    """A ProgressCallback whose bars read ``stage 'NAME': training`` / ``...: validation before training``."""
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    class LabelledProgress(ProgressCallback):
        def __init__(self) -> None:
            super().__init__()
            self.trained = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step = 0

        def on_step_begin(self, args, state, control, **kwargs):
            # Drawn at the first step, after the step-0 validation (eval_on_start) that train() runs first.
            if state.is_world_process_zero and self.training_bar is None:
                self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=f"stage '{stage}': training")
                self.current_step = 0

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
