"""Accuracy on downstream tasks with lm-evaluation-harness (``pip install 'tli-recipe[eval]'``).

The paper's claims are accuracies on multiple-choice benchmarks, scored the way the field
scores them: lm-eval's tasks, run here on local model folders through its Hugging Face backend
(``trust_remote_code=False``, float32 on the CPU unless told otherwise). Tasks are lm-eval task
names or task YAML files (a local JSONL multiple-choice set, see ``task_files``).

Every run is offline unless ``online=True``: the hub switches of huggingface_hub, datasets and
evaluate are set for the run (and restored), so a task whose data lives on the hub fails with a
message naming it instead of hanging on a network this tool may not have. For the run, lm-eval's
Jinja templates render in a sandbox (a task file is hostile input) and its git/environment
probes, which run ``git`` in the working directory, are skipped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tli_recipe.errors import TliError, did_you_mean
from tli_recipe.training.loading import TOKENIZER_FILES, has_tokenizer
from tli_recipe.training.mod import has_mod_head
from tli_recipe.training.task_files import is_task_file, load_task_file, split_specs

INSTALL = "pip install 'tli-recipe[eval]'"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")
#: lm-eval's default; acc and acc_norm have a closed-form stderr, so this costs only for metrics such as F1.
BOOTSTRAP_ITERS = 100_000


@dataclass(frozen=True)
class TaskScore:
    """One model on one task (or group): lm-eval's accuracies, their stderr, and any other metrics."""

    model: str
    task: str
    samples: Optional[int]
    acc: Optional[float] = None
    acc_stderr: Optional[float] = None
    acc_norm: Optional[float] = None
    acc_norm_stderr: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"f1": 0.61} for kobest_boolq

    def to_dict(self) -> dict:
        return asdict(self)


def require_lm_eval():
    """The lm_eval package, or a TliError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401 - the API this module needs
    except ImportError as exc:
        raise TliError(
            f"--tasks needs lm-evaluation-harness, which is not installed ({exc}); install it with: {INSTALL}"
        ) from None
    return lm_eval


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _needs_hub(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, ConnectionError) or "OfflineModeIsEnabled" in text or "offline mode" in text.lower()


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    if not hasattr(target, name):
        yield
        return
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


@contextlib.contextmanager
def _environment(name: str, value: Optional[str]) -> Iterator[None]:
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _sandboxed_templates():
    """lm-eval's template environment, rebuilt as a Jinja sandbox (no attribute walks to Python internals)
    with the recipe templates' bounds on ``*`` and ``**`` (``'x' * 10**9`` is refused, not computed)."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment
    from lm_eval import utils

    from tli_recipe.library.sandbox import BoundedOps

    class BoundedSandbox(BoundedOps, SandboxedEnvironment):
        pass

    env = BoundedSandbox(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters.update(utils.env.filters)
    return env


@contextlib.contextmanager
def session(online: bool = False) -> Iterator[None]:
    """Hub switches, sandboxed templates, quiet logging and no git probes for one lm-eval run, all restored."""
    lm_eval = require_lm_eval()
    import huggingface_hub.constants as hub
    from lm_eval import evaluator, utils

    with contextlib.ExitStack() as stack:
        if not online:
            for name in OFFLINE_ENV:
                stack.enter_context(_environment(name, "1"))
            # The libraries read these variables at import time, so the module constants are set too.
            stack.enter_context(_patched(hub, "HF_HUB_OFFLINE", True))
            for module, names in (
                ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                ("evaluate.config", ("HF_EVALUATE_OFFLINE",)),
            ):
                if module in sys.modules:
                    for name in names:
                        stack.enter_context(_patched(sys.modules[module], name, True))
        stack.enter_context(_patched(utils, "env", _sandboxed_templates()))
        stack.enter_context(_patched(evaluator, "get_git_commit_hash", lambda: None))
        stack.enter_context(_patched(evaluator, "add_env_info", lambda storage: None))
        logger = logging.getLogger(lm_eval.__name__)
        level = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
        yield


class TaskSet:
    """``--tasks`` entries resolved and loaded once (every error before any model loads), then scored per model."""

    def __init__(self, tasks: Sequence[str], *, online: bool = False, limit: Optional[int] = None) -> None:
        """``limit``: the documents per task that will be scored (their templates are rendered here first)."""
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.specs = split_specs(tasks)
        self.online = online
        # A task file becomes an inline config: lm-eval builds it without reading the file again.
        self.items: list[str | dict] = [load_task_file(s) if is_task_file(s) else s for s in self.specs]
        # Scanning lm-eval's own ~200 task folders takes seconds; local task files alone do not need it.
        defaults = any(isinstance(i, str) or "group" in i for i in self.items)
        with session(online):
            self.manager = TaskManager(include_defaults=defaults)
            for spec, item in zip(self.specs, self.items):
                if isinstance(item, str) and item not in self.manager.all_tasks:
                    raise TliError(
                        f"--tasks: no lm-eval task named {item!r}{did_you_mean(item, self.manager.all_tasks)}; "
                        "expected an lm-eval task name (`lm_eval ls tasks`) or a task YAML file"
                    )
                self._check_loads(spec, item, limit)

    def _check_loads(self, spec: str, item: str | dict, limit: Optional[int] = None) -> None:
        """Load the task and, for a task file, render its templates on every document to be scored in a
        child process under the template limits (``library/sandbox.py``): a template that would hang
        or exhaust memory stops here, naming the limit, before any model loads."""
        from tli_recipe.library.sandbox import LimitHit, run_bounded

        try:
            if isinstance(item, dict):
                try:
                    failed = run_bounded(_render_task, self.manager, item, limit)
                except LimitHit as hit:
                    raise TliError(
                        f"task {spec!r}: rendering its templates was stopped: {hit}; expected doc_to_text, "
                        "doc_to_choice and doc_to_target templates that render each document in milliseconds"
                    ) from None
                if failed:
                    raise TliError(
                        f"task {spec!r}: lm-eval could not load it ({failed}); expected a task whose data loads "
                        "and whose fields match its doc_to_text/doc_to_choice/doc_to_target"
                    )
            self.manager.load([copy.deepcopy(item)])
        except TliError:
            raise
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise anything; the user gets one line
            if _needs_hub(exc):
                raise TliError(
                    f"task {spec!r} reads its data from the Hugging Face hub ({_first_line(exc)}); "
                    "tli-recipe stays offline: pass --online where the hub is reachable, or point "
                    "--tasks at a local task YAML file"
                ) from None
            raise TliError(
                f"task {spec!r}: lm-eval could not load it ({_first_line(exc)}); expected a task whose "
                "data loads and whose fields match its doc_to_text/doc_to_choice/doc_to_target"
            ) from None

    def check_models(self, models: Sequence[str | Path], tokenizer: Optional[str | Path] = None) -> None:
        """Cheap checks of every model folder, before the first (slow) one is scored."""
        for model in models:
            check_model(Path(model), tokenizer)

    def score_models(
        self, models: Sequence[str | Path], *, log: Callable[[str], None] = lambda m: None, **options
    ) -> list[TaskScore]:
        """Every task on every model, in order; ``options`` go to :meth:`score`."""
        rows: list[TaskScore] = []
        for model in models:
            log(f"lm-eval: {', '.join(self.specs)} on {model}")
            rows.extend(self.score(model, **options))
        return rows

    def score(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
        limit: Optional[int] = None,
        tokenizer: Optional[str | Path] = None,
    ) -> list[TaskScore]:
        """Every task on one model folder, as rows in lm-eval's result order."""
        import lm_eval

        path = Path(model)
        check_model(path, tokenizer)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        args: dict[str, Any] = dict(pretrained=str(path), dtype=dtype, device=device, trust_remote_code=False)
        if tokenizer is not None:
            args["tokenizer"] = str(tokenizer)
        model_arg: Any = "hf"
        if has_mod_head(path):  # a MoD stage's output: lm-eval scores the model with its ensemble head
            from lm_eval.models.huggingface import HFLM

            from tli_recipe.training.loading import load_tokenizer
            from tli_recipe.training.mod import load as load_mod

            model_arg = HFLM(
                pretrained=load_mod(path, dtype=dtype, device=device),
                batch_size=batch_size,
                tokenizer=load_tokenizer(Path(tokenizer or path), "pass --tokenizer DIR"),
            )
            args = {}
        with session(self.online):
            try:
                out = lm_eval.simple_evaluate(
                    model=model_arg,
                    model_args=args,
                    tasks=copy.deepcopy(self.items),
                    task_manager=self.manager,
                    batch_size=batch_size,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=BOOTSTRAP_ITERS,
                )
            except TliError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise TliError(f"{path}: lm-eval failed on {', '.join(self.specs)} ({_first_line(exc)})") from None
        return scores_of(str(path), out)


def _render_task(manager, item: dict, limit: Optional[int]) -> Optional[str]:
    """Build every request of a task file's tasks (each template on each document), as ``simple_evaluate``
    will; runs in the bounded child. None when it worked, else the first line of the error."""
    try:
        for task in manager.load([copy.deepcopy(item)])["tasks"].values():
            task.build_all_requests(limit=limit, rank=0, world_size=1)
    except MemoryError:
        raise  # the limit that was hit: run_bounded reports it
    except Exception as exc:  # noqa: BLE001
        return _first_line(exc)
    return None


def check_model(path: Path, tokenizer: Optional[str | Path]) -> None:
    if not (path / "config.json").is_file():
        raise TliError(f"{path}: no config.json; expected a model directory")
    where = Path(tokenizer) if tokenizer is not None else path
    if not has_tokenizer(where):
        hint = "" if tokenizer is not None else "; pass --tokenizer DIR (the base model's)"
        raise TliError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}){hint}")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None  # lm-eval writes "N/A" for a stderr it cannot estimate (one sample)
    return float(value)


def scores_of(model: str, out: Optional[dict]) -> list[TaskScore]:
    """Rows from lm-eval's ``simple_evaluate`` result: ``"acc,none"`` -> acc, ``"acc_stderr,none"`` -> acc_stderr."""
    if not out:
        return []
    rows = []
    counts = out.get("n-samples", {})
    for task, values in out.get("results", {}).items():
        metrics: dict[str, Optional[float]] = {}
        for key, value in values.items():
            if "," not in key:
                continue  # "alias", "name", "sample_len"
            metric, _, filt = key.partition(",")
            metrics[metric if filt == "none" else f"{metric},{filt}"] = _number(value)
        named = {k: metrics.pop(k, None) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        samples = counts.get(task, {}).get("effective", values.get("sample_len"))
        rows.append(
            TaskScore(
                model=model,
                task=task,
                samples=samples,
                **named,
                metrics={k: v for k, v in metrics.items() if v is not None},
            )
        )
    return rows


def run_tasks(
    models: Sequence[str | Path],
    tasks: Sequence[str],
    *,
    online: bool = False,
    log: Callable[[str], None] = lambda m: None,
    **options,
) -> list[TaskScore]:
    """``tasks`` on every model folder; ``options`` go to :meth:`TaskSet.score` (device, dtype, limit ...)."""
    task_set = TaskSet(tasks, online=online, limit=options.get("limit"))
    task_set.check_models(models, options.get("tokenizer"))
    return task_set.score_models(models, log=log, **options)


def _cell(value: Optional[float], stderr: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def scores_table(rows: Sequence[TaskScore]) -> str:
    """One line per model and task: samples, acc ± stderr, acc_norm ± stderr."""
    header = ("model", "task", "samples", "acc ± stderr", "acc_norm ± stderr")
    lines = [
        (
            r.model,
            r.task,
            "-" if r.samples is None else str(r.samples),
            _cell(r.acc, r.acc_stderr),
            _cell(r.acc_norm, r.acc_norm_stderr),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(fmt(c) for c in (header, *lines))


def scores_json(rows: Sequence[TaskScore]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=2)
