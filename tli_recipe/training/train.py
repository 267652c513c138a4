"""The built-in trainer: run a plan's stages with the Hugging Face Trainer (and peft for LoRA).

Each stage reads its config (``emit.trl_config``: the checkpoint to start from, the
parameter names that train, LoRA settings, ``TrainingArguments``), and

1. loads the checkpoint in its own dtype and sets ``requires_grad`` on exactly the
   stage's parameters (or wraps the stage's projections in LoRA adapters with
   ``layers_to_transform``) before the Trainer builds its optimizer;
2. trains on packed text, saving resumable checkpoints into ``<stage dir>.partial``;
   a rerun resumes from the last of them;
3. merges LoRA adapters into the unquantized weights, and writes the stage directory
   (renamed into place when complete): the model, tokenizer, ``plan.json``,
   ``training_config.yaml``, ``training_metrics.json``, ``losses.csv`` and ``losses.png``.

Several GPUs or nodes: run the same command under ``accelerate launch``; the Trainer
does the distribution, only the main process writes the stage directory.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from tli_recipe._version import __version__
from tli_recipe.errors import TliError
from tli_recipe.training.data import pack, split_validation, tokenize
from tli_recipe.training.emit import select_stages, stage_specs, trl_config

COMPLETE = "training_metrics.json"  # present only in a finished stage directory


class TrainError(TliError):
    """A stage cannot start or finish; the message says what to do."""


def load_stage_config(path: str | Path) -> dict:
    """A stage config written by ``tli-recipe emit --format trl`` (comments allowed)."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TrainError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    needed = ("stage", "model", "output_dir", "datasets", "sequence_length", "trainable_parameters", "training_arguments")
    missing = [k for k in needed if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise TrainError(f"{path}: not a tli-recipe stage config (no {', '.join(missing)}); "
                         "expected a file from `tli-recipe emit --format trl`")
    return cfg


def stage_configs(model_dir: str | Path, *, data: Optional[Sequence[str | Path]] = None,
                  stages: Optional[Sequence[str]] = None, into: Optional[Path] = None) -> list[dict]:
    """The configs of the chosen stages of a grown checkpoint (all of them by default), in order."""
    from tli_recipe.execute.verify import load_plan

    model_dir = Path(model_dir).resolve()
    plan = load_plan(model_dir)
    specs = stage_specs(plan)
    if not specs:
        raise TrainError(f"{model_dir}/plan.json: the recipe defines no stages; add `stages` to the recipe and run it "
                         "again (see README: Recipes)")
    # "all" means every stage, unless a stage is itself named "all" (then it is that stage).
    every = not stages or ("all" in stages and "all" not in [s.plan.name for s in specs])
    chosen = select_stages(specs, None if every else stages)
    return [trl_config(plan, specs, spec, model_dir, data, into) for spec in chosen]


def train_output(model_dir: str | Path, *, data: Optional[Sequence[str | Path]] = None,
                 stages: Optional[Sequence[str]] = None, into: Optional[Path] = None, **kwargs) -> list[Path]:
    """Train the chosen stages of a grown checkpoint in order; returns the stage directories."""
    return [train_stage(cfg, **kwargs) for cfg in stage_configs(model_dir, data=data, stages=stages, into=into)]


def _device(device: str) -> bool:
    """True when training runs on the CPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"--device {device}: expected auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES; "
                         "several GPUs: accelerate launch, see --print-launch)")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    return device == "cpu" or not torch.cuda.is_available()


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
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainError(f"{source}: no tokenizer could be loaded ({str(exc).splitlines()[0][:160]}); stage '{stage}' "
                         "needs one to read the data: copy the base model's tokenizer files there, or pass --tokenizer DIR") from None


def _data(cfg: dict, tokenizer, log) -> tuple[list[list[int]], list[list[int]], int]:
    if not cfg["datasets"]:
        raise TrainError(f"stage '{cfg['stage']}' has no training data: pass --data FILE, or add `datasets` to the "
                         "stage in the recipe")
    ids = tokenize([(d["path"], d.get("text_field", "text")) for d in cfg["datasets"]], tokenizer)
    length = int(cfg["sequence_length"])
    blocks = pack(ids, length)
    if not blocks:
        raise TrainError(f"stage '{cfg['stage']}': the data has {len(ids)} tokens, fewer than one sequence of "
                         f"sequence_length={length}; add text or lower the stage's sequence_length")
    train, held = split_validation(blocks, float(cfg.get("validation_fraction") or 0))
    log(f"stage '{cfg['stage']}': {len(ids):,} tokens -> {len(train)} training and {len(held)} validation "
        f"sequences of {length}")
    return train, held, len(ids)


def _freeze(model, cfg: dict):
    """Set requires_grad on exactly the stage's parameters (or add its LoRA adapters); returns the model to train."""
    names = set(cfg["trainable_parameters"])
    params = dict(model.named_parameters())
    lora = cfg.get("lora")
    if lora is None:
        missing = sorted(names - set(params))
        if missing:
            raise TrainError(f"stage '{cfg['stage']}': {len(missing)} trainable parameters of the plan are not parameters "
                             f"of the loaded model (first: '{missing[0]}'); the checkpoint does not match its plan.json")
        for name, p in params.items():
            p.requires_grad_(name in names)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for p in params.values():
        p.requires_grad_(False)
    if lora.get("quantize"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
                        target_modules=list(lora["targets"]), task_type="CAUSAL_LM",
                        layers_to_transform=None if lora.get("all_layers") else list(lora["layers"]),
                        layers_pattern=None if lora.get("all_layers") else lora.get("layers_pattern"))
    model = get_peft_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    wanted = {n.removesuffix(".weight") for n in names}
    if wrapped != wanted:
        odd = sorted(wrapped ^ wanted)
        raise TrainError(f"stage '{cfg['stage']}': peft put adapters on {len(wrapped)} modules, the plan names "
                         f"{len(wanted)} (first difference: '{odd[0]}'); the checkpoint does not match its plan.json")
    return model


def _quantization(cfg: dict):
    lora = cfg.get("lora") or {}
    bits = lora.get("quantize")
    if not bits:
        return None
    import torch

    if not torch.cuda.is_available():
        raise TrainError(f"stage '{cfg['stage']}': lora.quantize: {bits} (QLoRA) needs bitsandbytes on a CUDA GPU; "
                         "this machine has none. Remove quantize to train plain LoRA")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise TrainError(f"stage '{cfg['stage']}': lora.quantize needs bitsandbytes: pip install bitsandbytes") from None
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def train_stage(cfg: dict, *, device: str = "auto", tokenizer: Optional[str | Path] = None, restart: bool = False,
                force: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                callbacks: Sequence = ()) -> Path:
    """Train one stage from its config; returns the finished stage directory."""
    out = Path(cfg["output_dir"])
    source = Path(cfg["model"])
    stage = cfg["stage"]
    if (out / COMPLETE).is_file() and not force:
        log(f"stage '{stage}': already trained ({out}); pass --force to train it again")
        return out
    if not (source / "config.json").is_file():
        before = "the previous stage's output; train the earlier stages first (or --stage all)" if cfg.get("index", 1) > 1 else "a grown checkpoint"
        raise TrainError(f"stage '{stage}' starts from {source}, which holds no config.json; expected {before}")
    if out.exists() and not (out / COMPLETE).is_file():
        raise TrainError(f"{out} exists but is not a finished stage (no {COMPLETE}); remove it or choose another --into")

    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )
    from transformers.trainer_utils import get_last_checkpoint

    on_cpu = _device(device)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tok = _load_tokenizer(Path(tokenizer) if tokenizer else source, stage)
    train_blocks, eval_blocks, n_tokens = _data(cfg, tok, log)

    work = out.with_name(out.name + ".partial")
    saved = work / "training_config.yaml"
    if restart and work.exists():
        shutil.rmtree(work)
    if saved.is_file() and yaml.safe_load(saved.read_text()) != cfg:
        raise TrainError(f"{work} holds an interrupted run of stage '{stage}' with a different config; pass --restart "
                         "to discard it, or rerun with the same settings to resume")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    last = get_last_checkpoint(str(work))

    quant = _quantization(cfg)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", quantization_config=quant,
                                                 **({"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}} if quant else {}))
    model = _freeze(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = dict(cfg["training_arguments"])
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:  # transformers >= 5.2x renamed them
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if old in args:
                args[new] = args.pop(old)
    if not eval_blocks:
        args["eval_strategy"] = "no"
        args.pop("eval_steps", None)
    targs = TrainingArguments(output_dir=str(work), use_cpu=on_cpu, disable_tqdm=not progress, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=_Blocks(train_blocks),
                      eval_dataset=_Blocks(eval_blocks) if eval_blocks else None,
                      data_collator=default_data_collator, callbacks=list(callbacks))
    steps = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    log(f"stage '{stage}': {trainable:,} trainable parameters"
        + (f" (LoRA r={cfg['lora']['r']} on {', '.join(cfg['lora']['targets'])})" if cfg.get("lora") else "")
        + f", {'resuming from ' + Path(last).name if last else 'starting'} in {work}"
        + (f", {steps} steps" if steps else ""))
    initial = work / "initial_eval.json"
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for results
        if eval_blocks and not initial.is_file():
            # The step-0 validation loss (the function the stage starts from); train() resets the log history.
            initial.write_text(json.dumps(trainer.evaluate()))
        trainer.train(resume_from_checkpoint=last)
        final_eval = trainer.evaluate() if eval_blocks else {}

    if trainer.is_world_process_zero():
        _finish(cfg, trainer, source, out, work, tok, trainable, n_tokens, len(train_blocks), len(eval_blocks),
                final_eval, last, log)
    trainer.accelerator.wait_for_everyone()
    return out


def _finish(cfg: dict, trainer, source: Path, out: Path, work: Path, tok, trainable: int, n_tokens: int,
            n_train: int, n_eval: int, final_eval: dict, resumed: Optional[str], log) -> None:
    """Write the stage directory next to ``out`` and rename it into place; drop the work directory."""
    from transformers import AutoModelForCausalLM

    from tli_recipe.execute.output import swap_into_place

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if cfg.get("lora"):
            adapter = tmp / "adapter"
            model.save_pretrained(adapter)
            # Merge into freshly loaded, unquantized weights: exact for LoRA, and the only way for QLoRA.
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        plan = Path(cfg.get("plan") or source / "plan.json")
        if plan.is_file():
            shutil.copyfile(plan, tmp / "plan.json")
        (tmp / "training_config.yaml").write_text(
            f"# The config stage '{cfg['stage']}' was trained with (tli-recipe {__version__}).\n"
            + yaml.safe_dump(cfg, sort_keys=False))
        history = list(trainer.state.log_history)
        if (work / "initial_eval.json").is_file():
            history.insert(0, {**json.loads((work / "initial_eval.json").read_text()), "step": 0})
        rows = loss_rows(history)
        write_losses(rows, tmp / "losses.csv")
        plotted = plot_losses(rows, tmp / "losses.png", f"{cfg['stage']}: loss")
        train_losses = [r["loss"] for r in rows if r.get("loss") is not None]
        eval_losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        metrics = {
            "stage": cfg["stage"], "input": str(source), "tli_recipe_version": __version__,
            "global_step": trainer.state.global_step, "epochs": trainer.state.epoch,
            "trainable_parameters": trainable, "lora": cfg.get("lora"),
            "tokens": n_tokens, "train_sequences": n_train, "validation_sequences": n_eval,
            "sequence_length": cfg["sequence_length"],
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "eval_loss_before": eval_losses[0] if eval_losses else None,
            "eval_loss_after": final_eval.get("eval_loss"),
            "eval_perplexity_after": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
            "resumed_from": Path(resumed).name if resumed else None,
            "plot": "losses.png" if plotted else None,
        }
        (tmp / COMPLETE).write_text(json.dumps(metrics, indent=2) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    before = f"{metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}" if eval_losses and final_eval else "n/a"
    log(f"stage '{cfg['stage']}': wrote {out} ({metrics['global_step']} steps; training loss "
        f"{metrics['train_loss_first'] if metrics['train_loss_first'] is None else format(metrics['train_loss_first'], '.4f')} -> "
        f"{metrics['train_loss_last'] if metrics['train_loss_last'] is None else format(metrics['train_loss_last'], '.4f')}; "
        f"validation loss {before})")


def loss_rows(history: list[dict]) -> list[dict]:
    """One row per step from the Trainer's log history: step, epoch, learning_rate, loss, eval_loss."""
    rows: dict[int, dict] = {}
    for entry in history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        row = rows.setdefault(int(entry.get("step", 0)), {"step": int(entry.get("step", 0))})
        for key in ("epoch", "learning_rate", "loss", "eval_loss"):
            if key in entry:
                row[key] = entry[key]
    return [rows[k] for k in sorted(rows)]


def write_losses(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "learning_rate", "loss", "eval_loss"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})


def plot_losses(rows: list[dict], path: Path, title: str) -> bool:
    """A PNG of the training and validation loss; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def launch_command(argv: Sequence[str], gpus: int) -> str:
    """The ``accelerate launch`` line that runs ``tli-recipe <argv>`` on ``gpus`` GPUs of this machine."""
    import shlex

    parts = ["accelerate", "launch", "--num_processes", str(gpus)] + (["--multi_gpu"] if gpus > 1 else [])
    return " ".join(parts) + " -m tli_recipe " + " ".join(shlex.quote(str(a)) for a in argv)


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
