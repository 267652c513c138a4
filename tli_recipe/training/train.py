"""The built-in trainer: run a plan's stages with the Hugging Face Trainer (and peft for LoRA).

Each stage reads its config (a :class:`~tli_recipe.training.builtin.BuiltinStageConfig`:
the checkpoint to start from, the parameter names that train, LoRA settings,
``TrainingArguments``), and

1. loads the checkpoint in its own dtype and sets ``requires_grad`` on exactly the
   stage's parameters (or wraps the stage's projections in LoRA adapters with
   ``layers_to_transform``) before the Trainer builds its optimizer;
2. trains on packed text, saving resumable checkpoints into ``<stage dir>.partial``;
   a rerun resumes from the last of them;
3. merges LoRA adapters into the unquantized weights, and writes the stage directory
   (renamed into place when complete): the model, tokenizer, ``plan.json``,
   ``training_config.yaml``, ``training_metrics.json``, ``losses.csv`` and ``losses.png``.

Several GPUs or nodes: run the same command under ``accelerate launch`` (:mod:`~tli_recipe.training.launch`);
the Trainer does the distribution, and only the main process (rank 0) writes files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml
from pydantic import ValidationError

from tli_recipe.errors import TliError
from tli_recipe.training import finish
from tli_recipe.training.builtin import (
    BuiltinStageConfig,
    absolute_config,
    builtin_config,
    check_layout,
)
from tli_recipe.training.data import pack, split_validation, tokenize
from tli_recipe.training.finish import (
    COMPLETE,
    check_resume,
    finish_stage,
    last_checkpoint,
    read_json,
    write_atomic,
    write_json,
)
from tli_recipe.training.launch import is_main_process, launched
from tli_recipe.training.loading import load_model, load_tokenizer
from tli_recipe.training.stages import select_stages, stage_specs


class TrainError(TliError):
    """A stage cannot start or finish; the message says what to do."""


class Preempted(TliError):
    """A signal stopped training after a checkpoint (SIGTERM, or a first Ctrl-C); the same command resumes
    from it. The exit status is 128 + the signal's number: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self, message: str, signum: Optional[int] = None) -> None:
        super().__init__(message)
        self.exit_code = 128 + (signum or signal.SIGTERM)


#: How the messages name each signal that stops training.
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class Preemption:
    """SIGTERM (what SLURM and Kubernetes send before they stop a job) and a first Ctrl-C (SIGINT) ask for a
    checkpoint at the next optimizer step: every process finishes the step it is in, they agree (one
    all-reduce of a flag per step, since the signal reaches them at different moments), the Trainer saves a
    checkpoint, and :func:`train_stage` raises :class:`Preempted`. A second Ctrl-C exits at once with status
    130; the stage resumes from its last saved checkpoint. Used as a context manager around the stages.

    Python runs a signal handler only when the main thread is back in the interpreter, and a training step
    is one long call into torch (minutes for a long sequence on a CPU), so the signals are read here by a
    thread from the interpreter's wakeup file descriptor, which the C-level handler writes at once: the
    first Ctrl-C is acknowledged and the second one ends the process while the step still runs."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None  # the first signal that asked to stop
        self.interrupts = 0  # Ctrl-C presses seen
        self._previous: dict[int, object] = {}
        self._pipe: Optional[tuple[int, int]] = None
        self._wakeup = -1
        self._thread: Optional[threading.Thread] = None

    @property
    def name(self) -> str:
        """How messages name the signal that stopped training."""
        return SIGNAL_NAMES.get(self.signum or signal.SIGTERM, "SIGTERM")

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return self
        for signum in SIGNAL_NAMES:
            self._previous[signum] = signal.signal(signum, self._handle)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="tli-recipe-signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._wakeup)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        read, write = self._pipe
        os.write(write, b"\0")  # not a signal number: the watching thread ends
        if self._thread is not None:
            self._thread.join()
        os.close(read)
        os.close(write)
        self._pipe = self._thread = None

    def _handle(self, signum, frame) -> None:
        """The Python-level handler, run when the main thread is back in the interpreter: the request
        (the thread may not have run yet); the thread alone counts Ctrl-C presses."""
        self.signum = self.signum or signum
        self.requested = True

    def _watch(self) -> None:
        read = self._pipe[0]  # type: ignore[index]
        while True:
            data = os.read(read, 64)
            for signum in data:
                if signum == 0:
                    return
                self.received(signum)

    def received(self, signum: int) -> None:
        """One delivered signal: SIGTERM or a first Ctrl-C asks for a stop at the next step; a second Ctrl-C
        ends the process now, with status 130."""
        if signum not in SIGNAL_NAMES:
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                for tmp in list(finish.WRITING):  # a stage being written: no half-written folder stays
                    shutil.rmtree(tmp, ignore_errors=True)
                _say(f"interrupted: Ctrl-C again: stopped at once; {RESUME_LAST}")
                os._exit(128 + signal.SIGINT)
            _say(
                "Ctrl-C: stopping at the end of this optimizer step with a checkpoint "
                "(press Ctrl-C again to stop at once, losing this step)"
            )
        self.signum = self.signum or signum
        self.requested = True

    def callback(self):
        """A TrainerCallback that stops and saves at the first step boundary after the signal in any process."""
        from transformers import TrainerCallback

        preemption = self

        class StopOnSignal(TrainerCallback):
            stopped_at: Optional[int] = None

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
                import torch
                import torch.distributed as dist

                flag = preemption.requested
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    agreed = torch.tensor([int(flag)], device=args.device)
                    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                    flag = bool(agreed.item())
                if flag:
                    control.should_save = True
                    control.should_training_stop = True
                    self.stopped_at = state.global_step
                return control

        return StopOnSignal()


def _say(message: str) -> None:
    """A line on stderr from the signal thread (the main process only: one speaks for all of them)."""
    if is_main_process():
        try:
            sys.stderr.write(f"\n{message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed stderr must not keep the process from stopping
            pass


#: How an interrupted command continues.
RESUME = "run the same command again to resume from the last checkpoint (--restart to start over)"
RESUME_LAST = "the stage keeps its last saved checkpoint; " + RESUME

#: What the built-in trainer needs beyond the base install: the ``train`` extra.
TRAIN_EXTRA = ("peft", "accelerate")


def require_train_extra() -> None:
    """Refuse to start, with the install line, when the ``train`` extra is missing (not an ImportError
    from deep inside transformers' Trainer)."""
    import importlib

    missing = []
    for name in TRAIN_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise TrainError(
            f"training needs the train extra ({' and '.join(missing)} not installed); expected "
            "`pip install 'tli-recipe[train]'` (peft, accelerate>=1.1, matplotlib)"
        )


def load_stage_config(path: str | Path, into: bool = False) -> BuiltinStageConfig:
    """A stage config written by ``tli-recipe emit --format builtin`` (comments allowed), validated;
    ``into``: the caller writes the stage elsewhere (``--into``), so its ``output_dir`` is not used."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TrainError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "stage" not in raw or "training_arguments" not in raw:
        raise TrainError(
            f"{path}: not a tli-recipe stage config; expected a file from `tli-recipe emit --format builtin`"
        )
    try:
        cfg = absolute_config(BuiltinStageConfig.model_validate(raw), path.parent)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg'].lower()}" for e in exc.errors()[:5]
        )
        raise TrainError(
            f"{path}: not a valid stage config ({problems}); expected a file from `tli-recipe emit --format builtin`"
        ) from None
    check_layout(cfg, path, into)
    return cfg


def stage_configs(
    model_dir: str | Path,
    *,
    data: Optional[Sequence[str | Path]] = None,
    stages: Optional[Sequence[str]] = None,
    into: Optional[Path] = None,
    overrides: Sequence[str] = (),
) -> list[BuiltinStageConfig]:
    """The configs of the chosen stages of a grown checkpoint (all of them by default), in order;
    ``overrides`` (``stages[*].FIELD=VALUE``) change the stages' settings first."""
    from tli_recipe.execute.verify import load_plan
    from tli_recipe.training.settings import override_stages

    model_dir = Path(model_dir).resolve()
    plan = override_stages(load_plan(model_dir), overrides, str(model_dir))
    specs = stage_specs(plan)
    if not specs:
        raise TrainError(
            f"{model_dir}/plan.json: the recipe defines no stages; add `stages` to the recipe and run it "
            "again (see docs/recipes.md)"
        )
    # "all" means every stage, unless a stage is itself named "all" (then it is that stage).
    every = not stages or ("all" in stages and "all" not in [s.plan.name for s in specs])
    chosen = select_stages(specs, None if every else stages)
    return [builtin_config(plan, specs, spec, model_dir, data, into) for spec in chosen]


def train_output(
    model_dir: str | Path,
    *,
    data: Optional[Sequence[str | Path]] = None,
    stages: Optional[Sequence[str]] = None,
    into: Optional[Path] = None,
    overrides: Sequence[str] = (),
    **kwargs,
) -> list[Path]:
    """Train the chosen stages of a grown checkpoint in order; returns the stage directories."""
    return [
        train_stage(cfg, **kwargs)
        for cfg in stage_configs(model_dir, data=data, stages=stages, into=into, overrides=overrides)
    ]


def run_train(
    model_dir: Optional[str | Path],
    config: Optional[str | Path],
    *,
    data: Sequence[str | Path] = (),
    stages: Sequence[str] = (),
    into: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    max_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    **kwargs,
) -> list[Path]:
    """``tli-recipe train``: the chosen stages of a grown checkpoint (``model_dir``), or one stage from an
    emitted ``config`` file, with the command's flags applied; SIGTERM or Ctrl-C stops at a checkpoint
    (:class:`Preempted`), a second Ctrl-C at once. Returns the stage directories."""
    from tli_recipe.training.settings import flag_overrides

    with Preemption() as preemption:
        if config is None:
            return train_output(
                model_dir,  # type: ignore[arg-type]
                data=data or None,
                stages=stages or None,
                overrides=flag_overrides(max_steps, learning_rate) + list(overrides),
                into=Path(into) if into else None,
                preemption=preemption,
                **kwargs,
            )
        cfg = load_stage_config(config, into=bool(into))
        if data:
            from tli_recipe.training.builtin import DataFile

            cfg.datasets = [DataFile(path=str(Path(d).resolve())) for d in data]
        if into:
            cfg.output_dir = str(Path(into) / cfg.stage)
        if max_steps:
            cfg.training_arguments = {k: v for k, v in cfg.training_arguments.items() if k != "num_train_epochs"}
            cfg.training_arguments["max_steps"] = max_steps
        if learning_rate:
            cfg.training_arguments["learning_rate"] = learning_rate
        return [train_stage(cfg, preemption=preemption, **kwargs)]


def check_report_to(report_to: str) -> None:
    """``--report-to``: the logger must be installed (the Trainer would fail later, or silently log nothing)."""
    if report_to == "none":
        return
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]():
        raise TrainError(
            f"--report-to {report_to}: {report_to} is not installed; pip install {report_to} (or --report-to none)"
        )


def _device(device: str) -> bool:
    """True when training runs on the CPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(
            f"--device {device}: expected auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES; "
            "several GPUs: accelerate launch, see --print-launch)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    return device == "cpu" or not torch.cuda.is_available()


#: Why a CPU trains in float32: measured on a CPU, bfloat16 autocast made each step many times slower.
CPU_BFLOAT16 = "bfloat16 is many times slower than float32 on a CPU"


def choose_precision(cfg: BuiltinStageConfig, on_cpu: bool, gpu: Optional[tuple[str, bool]] = None) -> tuple[dict, str]:
    """The ``bf16`` argument that ``precision: auto`` resolves to, and the line that says what was chosen and
    why. ``gpu``: the GPU's name and whether it has bfloat16 (None on a CPU). An explicit precision (or bf16 or
    fp16 in the config's training_arguments) stays, with a warning for bfloat16 on a CPU."""
    args = cfg.training_arguments
    if cfg.precision == "auto" and "bf16" not in args and "fp16" not in args:
        if on_cpu or gpu is None:
            return {"bf16": False}, f"precision auto -> float32 (training on the CPU; {CPU_BFLOAT16})"
        name, has_bf16 = gpu
        if has_bf16:
            return {"bf16": True}, f"precision auto -> bfloat16 (the GPU, {name}, has bfloat16)"
        return {"bf16": False}, f"precision auto -> float32 (the GPU, {name}, has no bfloat16)"
    chosen = "bfloat16" if args.get("bf16") else "float16" if args.get("fp16") else "float32"
    if chosen == "bfloat16" and on_cpu:
        return {}, (
            f"warning: precision bfloat16 on the CPU: {CPU_BFLOAT16}; to train in float32 pass "
            "--set 'stages[*].precision=auto' (or float32)"
        )
    return {}, f"precision {chosen} (the stage's setting)"


def _gpu() -> Optional[tuple[str, bool]]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), bool(torch.cuda.is_bf16_supported())


def _initial_eval(path: Path):
    """A callback keeping the step-0 validation loss (``eval_on_start``) in ``initial_eval.json``: ``train()``
    resets the log history on resume, so the stage's first loss is read from there at its end."""
    from transformers import TrainerCallback

    class InitialEval(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ARG002
            if state.global_step == 0 and state.is_world_process_zero and metrics is not None:
                write_json(path, dict(metrics))

    return InitialEval()


class _Blocks:
    """A torch-style dataset of packed sequences; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        import torch

        ids = torch.tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


def _load_tokenizer(source: Path, stage: str):
    return load_tokenizer(
        source,
        f"stage '{stage}' needs one to read the data: copy the base model's tokenizer files "
        "there, or pass --tokenizer DIR",
    )


def _data(cfg: BuiltinStageConfig, tokenizer, log) -> tuple[list[list[int]], list[list[int]], int]:
    if not cfg.datasets:
        raise TrainError(
            f"stage '{cfg.stage}' has no training data: pass --data FILE, or add `datasets` to the stage in the recipe"
        )
    files = [(Path(d.path).expanduser().resolve(), d.text_field) for d in cfg.datasets]
    for path, _ in files:  # said before anything is read: a shared recipe decides which files train reads
        log(f"data: {path}")
    ids = tokenize(files, tokenizer)
    length = cfg.sequence_length
    blocks = pack(ids, length)
    if not blocks:
        raise TrainError(
            f"stage '{cfg.stage}': the data has {len(ids)} tokens, fewer than one sequence of "
            f"sequence_length={length}; add text or lower the stage's sequence_length"
        )
    train, held = split_validation(blocks, cfg.validation_fraction)
    log(
        f"stage '{cfg.stage}': {len(ids):,} tokens -> {len(train)} training and {len(held)} validation "
        f"sequences of {length}"
    )
    return train, held, len(ids)


def loaded_names(names: set[str], params: dict, config: dict) -> set[str]:
    """Checkpoint tensor names as the loaded model's parameter names: transformers (>= 5) renames MoE
    tensors and fuses the experts of a layer into one parameter (the architecture's ``loaded_names``).
    A stage selects all of a layer's experts or none (the plan's groups cannot split them)."""
    if names <= set(params):
        return names
    from tli_recipe.source.arch import ArchError, find_architecture

    try:
        arch = find_architecture(config)
    except ArchError:
        return names
    return {n if n in params else arch.loaded_name(n) for n in names}


def _freeze(model, cfg: BuiltinStageConfig):
    """Set requires_grad on exactly the stage's parameters (or add its LoRA adapters); returns the model to train."""
    names = set(cfg.trainable_parameters)
    params = dict(model.named_parameters())
    lora = cfg.lora
    if lora is None:
        names = loaded_names(names, params, model.config.to_dict())
        missing = sorted(names - set(params))
        if missing:
            raise TrainError(
                f"stage '{cfg.stage}': {len(missing)} trainable parameters of the plan are not parameters "
                f"of the loaded model (first: '{missing[0]}'); the checkpoint does not match its plan.json"
            )
        for name, p in params.items():
            p.requires_grad_(name in names)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for p in params.values():
        p.requires_grad_(False)
    if lora.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
        layers_to_transform=None if lora.all_layers else list(lora.layers),
        layers_pattern=None if lora.all_layers else lora.layers_pattern,
    )
    model = get_peft_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    wanted = {n.removesuffix(".weight") for n in names}
    if wrapped != wanted:
        odd = sorted(wrapped ^ wanted)
        raise TrainError(
            f"stage '{cfg.stage}': peft put adapters on {len(wrapped)} modules, the plan names "
            f"{len(wanted)} (first difference: '{odd[0]}'); the checkpoint does not match its plan.json"
        )
    return model


def _quantization(cfg: BuiltinStageConfig):
    bits = cfg.lora.quantize if cfg.lora is not None else None
    if not bits:
        return None
    import torch

    if not torch.cuda.is_available():
        raise TrainError(
            f"stage '{cfg.stage}': lora.quantize: {bits} (QLoRA) needs bitsandbytes on a CUDA GPU; "
            "this machine has none. Remove quantize to train plain LoRA"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise TrainError(f"stage '{cfg.stage}': lora.quantize needs bitsandbytes: pip install bitsandbytes") from None
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def _arguments(
    cfg: BuiltinStageConfig,
    work: Path,
    on_cpu: bool,
    progress: bool,
    validation: bool,
    report_to: str = "none",
    evaluate_first: bool = False,
    precision: Optional[dict] = None,
):
    """``TrainingArguments`` of the stage (creating them also sets up the processes under ``accelerate launch``).

    ``evaluate_first``: the step-0 validation loss is measured inside ``train()`` (``eval_on_start``), after
    the Trainer has wrapped the model for several processes (DDP, FSDP, DeepSpeed). Evaluating before
    ``train()`` marked the bare model as prepared, so accelerate never wrapped it: the ranks trained
    unsynchronised replicas (and DeepSpeed ZeRO-2 refused the evaluation)."""
    from transformers import TrainingArguments

    args = {**cfg.training_arguments, **(precision or {})}  # precision: auto resolved (choose_precision)
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:  # transformers >= 5.2x renamed them
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if old in args:
                args[new] = args.pop(old)
    if report_to != "none":  # not part of the config: changing it does not stop a resume
        check_report_to(report_to)
        args["report_to"] = report_to
    if not validation:
        args["eval_strategy"] = "no"
        args.pop("eval_steps", None)
    args["eval_on_start"] = evaluate_first  # not part of the config: a resume does not evaluate again
    why = unsharded(args, on_cpu, launched())
    if why:
        for key in ("fsdp", "fsdp_config", "deepspeed"):
            args.pop(key, None)
        if is_main_process():
            print(f"stage '{cfg.stage}': {why}", file=sys.stderr)
    try:
        return TrainingArguments(output_dir=str(work), use_cpu=on_cpu, disable_tqdm=not progress, **args)
    except (TypeError, ValueError) as exc:
        raise TrainError(
            f"stage '{cfg.stage}': training_arguments are not valid TrainingArguments "
            f"({str(exc).splitlines()[0][:200]}); fix the stage config or emit it again"
        ) from None


def unsharded(args: dict, on_cpu: bool, launched: bool) -> Optional[str]:
    """Why the stage's sharding cannot apply in this run (it then trains as ddp, saying so), or None."""
    strategy = next((k for k in ("fsdp", "deepspeed") if k in args), None)
    if strategy and not launched:  # FSDP and DeepSpeed need the processes a launcher starts
        return (
            f"distributed: {strategy} applies under a launcher (see train --print-launch); this single process "
            "trains the whole model"
        )
    if strategy == "fsdp" and on_cpu:  # accelerate would silently run DDP instead (its FSDP needs GPUs)
        return "distributed: fsdp needs GPUs (accelerate runs FSDP on GPUs only); these CPU processes train as ddp"
    return None


def _read_yaml(path: Path):
    """A YAML file an earlier run wrote, or None (absent, or cut short by a crash)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _prepare_work(cfg: BuiltinStageConfig, targs, work: Path, restart: bool) -> Optional[str]:
    """The main process sets up the work directory (the others wait); returns the checkpoint to resume from."""
    saved = work / "training_config.yaml"
    wanted = cfg.model_dump()
    with targs.main_process_first(local=False, desc="preparing the work directory"):
        if is_main_process():
            if restart and work.exists():
                shutil.rmtree(work)
            if _read_yaml(saved) not in (None, wanted):
                raise TrainError(
                    f"{work} holds an interrupted run of stage '{cfg.stage}' with a different config; "
                    "pass --restart to discard it, or rerun with the same settings to resume"
                )
            work.mkdir(parents=True, exist_ok=True)
            write_atomic(saved, yaml.safe_dump(wanted, sort_keys=False))
    return last_checkpoint(work)


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_start(cfg: BuiltinStageConfig, force: bool, log) -> bool:
    """False when the stage is already trained; raises when it cannot start."""
    out, source = Path(cfg.output_dir), Path(cfg.model)
    if (out / COMPLETE).is_file() and not force:
        log(f"stage '{cfg.stage}': already trained ({out}); pass --force to train it again")
        return False
    if not (source / "config.json").is_file():
        before = (
            "the previous stage's output; train the earlier stages first (or --stage all)"
            if cfg.index > 1
            else "a grown checkpoint"
        )
        raise TrainError(f"stage '{cfg.stage}' starts from {source}, which holds no config.json; expected {before}")
    if out.exists() and not (out / COMPLETE).is_file():
        raise TrainError(
            f"{out} exists but is not a finished stage (no {COMPLETE}); remove it or choose another --into"
        )
    return True


def train_stage(
    cfg: BuiltinStageConfig | dict,
    *,
    device: str = "auto",
    tokenizer: Optional[str | Path] = None,
    restart: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callbacks: Sequence = (),
    report_to: str = "none",
    preemption: Optional[Preemption] = None,
) -> Path:
    """Train one stage from its config; returns the finished stage directory. With ``preemption`` (a
    :class:`Preemption` entered around the stages), SIGTERM or Ctrl-C saves a checkpoint and raises
    :class:`Preempted`."""
    require_train_extra()
    if isinstance(cfg, dict):
        cfg = BuiltinStageConfig.model_validate(cfg)
    main = is_main_process()
    log = log if main else (lambda msg: None)  # one process speaks for all of them
    out, source, stage = Path(cfg.output_dir), Path(cfg.model), cfg.stage
    if not _check_start(cfg, force, log):
        return out
    replace = (out / COMPLETE).is_file()  # --force on a finished stage; anything else there later is not ours
    from tli_recipe.training.mod import HEAD_FILE, has_mod_head

    if has_mod_head(source):  # said, not silently dropped: a stage loads the model without it
        log(
            f"stage '{stage}': {source / HEAD_FILE} (a MoD head) is not used: this stage trains "
            + ("a new head over the model" if cfg.mod is not None else "the model alone, and its output has no head")
        )
    work = out.with_name(out.name + ".partial")
    if preemption is not None and preemption.requested:  # between two stages: the next one does not start
        raise Preempted(f"{preemption.name}: stopped before stage '{stage}'; {RESUME}", preemption.signum)

    from transformers import Trainer, default_data_collator

    on_cpu = _device(device)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tok = _load_tokenizer(Path(tokenizer) if tokenizer else source, stage)
    train_blocks, eval_blocks, n_tokens = _data(cfg, tok, log)
    initial = work / "initial_eval.json"
    # Decided before anyone evaluates: every process must take part in the same evaluations.
    # Step 0 only: a resumed run (a checkpoint in the work directory) is past it.
    evaluate_first = bool(eval_blocks) and (restart or (read_json(initial) is None and not last_checkpoint(work)))
    precision, why = choose_precision(cfg, on_cpu, None if on_cpu else _gpu())
    log(f"stage '{stage}': {why}")
    targs = _arguments(cfg, work, on_cpu, progress, bool(eval_blocks), report_to, evaluate_first, precision)
    last = _prepare_work(cfg, targs, work, restart)
    if last is not None:
        check_resume(Path(last))  # hostile input like any file read back: one line, not a Trainer traceback

    if "deepspeed" in cfg.training_arguments and dist_initialized():
        # ZeRO-3 builds the model sharded (zero.Init inside from_pretrained), with DeepSpeed's own view of
        # the processes: without it DeepSpeed counts one process and refuses the batch sizes.
        import deepspeed

        deepspeed.init_distributed()
    quant = _quantization(cfg)
    model = load_model(
        source,
        dtype="auto",
        quantization_config=quant,
        **({"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}} if quant else {}),
    )
    model = _freeze(model, cfg)
    trainer_cls, mod_hooks = Trainer, None
    if cfg.mod is not None:  # objective: mod: the ensemble head trains beside the stage's parameters
        from tli_recipe.training.mod import attach, mod_trainer, new_head

        mod_hooks = attach(model, new_head(model, cfg.mod.layers, cfg.mod.init))
        trainer_cls = mod_trainer(cfg.mod, last)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = trainer_cls(
        model=model,
        args=targs,
        train_dataset=_Blocks(train_blocks),
        eval_dataset=_Blocks(eval_blocks) if eval_blocks else None,
        data_collator=default_data_collator,
        callbacks=list(callbacks),
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tli_recipe.training.progress import above_bars, labelled_progress, step_clock

    clock = step_clock(stage, above_bars(log) if progress else log)
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # the raw log dicts (with --no-progress); the summary ends the stage
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(labelled_progress(stage, clock, cfg.sequence_length))
    steps = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    log(
        f"stage '{stage}': {trainable:,} trainable parameters"
        + (f" (LoRA r={cfg.lora.r} on {', '.join(cfg.lora.targets)})" if cfg.lora else "")
        + f", {'resuming from ' + Path(last).name if last else 'starting'} in {work}"
        + (f", {steps} steps" if steps else "")
    )
    if evaluate_first:
        trainer.add_callback(_initial_eval(initial))
    stop = preemption.callback() if preemption is not None else None
    if stop is not None:
        trainer.add_callback(stop)
    # While the data and the model loaded. One process alone: several must agree first (the callback does).
    if preemption is not None and preemption.requested and not dist_initialized():
        raise Preempted(f"{preemption.name}: stopped before stage '{stage}' trained; {RESUME}", preemption.signum)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for results
        trainer.train(resume_from_checkpoint=last)
        if stop is not None and stop.stopped_at is not None:
            trainer.accelerator.wait_for_everyone()  # every process's part of the checkpoint is written
            raise Preempted(
                f"{preemption.name}: stage '{stage}' stopped after step {stop.stopped_at}, saved in "
                f"{work / f'checkpoint-{stop.stopped_at}'}; {RESUME}",
                preemption.signum,
            )
        final_eval = trainer.evaluate() if eval_blocks else {}

    state_dict = None
    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # Each process holds a shard of every parameter: all of them gather the whole tensors for rank 0.
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    extra = None
    if mod_hooks is not None:  # the model is saved plain; the head goes beside it
        from tli_recipe.training.mod import detach, save_head

        head = detach(trainer.accelerator.unwrap_model(trainer.model), mod_hooks)

        def extra(folder: Path) -> None:
            save_head(head, folder, cfg.mod.distill_weight)

    if trainer.is_world_process_zero():
        finish_stage(
            cfg,
            trainer,
            out,
            work,
            tok,
            (trainable, n_tokens, len(train_blocks), len(eval_blocks)),
            final_eval,
            last,
            log,
            extra=extra,
            replace=replace,
            state_dict=state_dict,
        )
    trainer.accelerator.wait_for_everyone()
    return out
