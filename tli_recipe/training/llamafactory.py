"""LLaMA-Factory configs: its layer and module selection rules, the stage config and dataset_info.json.

LLaMA-Factory selects what trains by layer ids (the last N, the first N, or LLaMA Pro's
evenly spaced layers) and substring matches of module names. Every emitted selection is
checked against those rules (written out below) on the plan's tensor names; a stage they
cannot express exactly is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tli_recipe.plan.model import SettingsDataset
from tli_recipe.training.data import is_jsonl, record_format
from tli_recipe.training.distributed import DEEPSPEED_SUFFIX, deepspeed_config, fsdp_arguments
from tli_recipe.training.fields import Key, is_bf16, is_fp16, mapped
from tli_recipe.training.stages import (
    Refusal,
    StageFiles,
    StageSpec,
    TrainerFormat,
    dump_yaml,
    integer_alpha,
    layer_prefix,
    resolve_datasets,
    stage_dir,
    stage_input,
    tensor_names,
)

#: Hyperparameters, in the order LLaMA-Factory configs list them (output_dir sits between the two).
CHECKPOINT_KEYS = (
    Key("logging_steps", "logging_steps"),
    Key("save_steps", "save_steps"),
    Key("save_total_limit", "save_total_limit"),
)
TRAINING_KEYS = (
    Key("batch_size", "per_device_train_batch_size"),
    Key("gradient_accumulation", "gradient_accumulation_steps"),
    Key("learning_rate", "learning_rate"),
    Key("scheduler", "lr_scheduler_type"),
    Key("warmup_steps", "warmup_steps"),
    Key("weight_decay", "weight_decay"),
    Key("optimizer", "optim"),
    Key("max_steps", "max_steps"),
    Key("epochs", "num_train_epochs", float),
    # auto: true (LLaMA-Factory takes true or false only, and trains on GPUs; the header says how to turn it off)
    Key("precision", "bf16", lambda p: p == "auto" or is_bf16(p)),
    Key("precision", "fp16", is_fp16),
    # LLaMA-Factory turns gradient checkpointing on unless told otherwise.
    Key("gradient_checkpointing", "disable_gradient_checkpointing", lambda on: not on),
)
VALIDATION_KEYS = (
    Key("validation_fraction", "val_size"),
    Key("batch_size", "per_device_eval_batch_size"),
    Key("eval_steps", "eval_steps"),
)


def layer_options(layers: list[int], num_layers: int) -> list[dict]:
    """The ``freeze_trainable_layers`` settings whose layer ids equal ``layers`` (LLaMA-Factory's rules).

    ``use_llama_pro`` with N: ``range(stride - 1, L, stride)``, ``stride = L // N``, only when N divides L;
    N > 0: the last N layers; N < 0: the first |N|.
    """
    n, options = len(layers), []
    if n and num_layers % n == 0:
        stride = num_layers // n
        if layers == list(range(stride - 1, num_layers, stride)):
            options.append({"use_llama_pro": True, "freeze_trainable_layers": n})
    if n and layers == list(range(num_layers - n, num_layers)):
        options.append({"freeze_trainable_layers": n})
    if n and layers == list(range(n)):
        options.append({"freeze_trainable_layers": -n})
    return options


def layer_ids(option: dict, num_layers: int) -> list[int]:
    n = option["freeze_trainable_layers"]
    if option.get("use_llama_pro"):
        stride = num_layers // n
        return list(range(stride - 1, num_layers + stride - 1, stride))
    return list(range(max(0, num_layers - n), num_layers)) if n > 0 else list(range(min(-n, num_layers)))


def llamafactory_freeze_selects(names: Iterable[str], layer_ids: Iterable[int], extra: Iterable[str]) -> set[str]:
    """LLaMA-Factory's freeze rule (``_setup_freeze_tuning``): a parameter trains when its name
    contains ``.{id}.`` for a trainable layer id, or one of ``freeze_extra_modules``, as a substring."""
    keys = [f".{i}." for i in layer_ids] + list(extra)
    return {n for n in names if any(k in n for k in keys)}


def llamafactory_lora_modules(
    names: Iterable[str], targets: Sequence[str], layer_ids: Optional[Iterable[int]]
) -> set[str]:
    """The modules LLaMA-Factory puts adapters on: peft's suffix match of ``lora_target``, or with
    ``use_llama_pro`` its ``find_expanded_modules`` substring match on target and ``.{id}.``."""
    modules = set()
    for name in names:
        parts = name.split(".")
        modules |= {".".join(parts[:k]) for k in range(1, len(parts))}
    if layer_ids is None:
        return {m for m in modules if any(m == t or m.endswith("." + t) for t in targets)}
    ids = [f".{i}." for i in layer_ids]
    return {m for m in modules if any(t in m for t in targets) and any(i in m for i in ids)}


def llamafactory_dataset_info(datasets: list[SettingsDataset]) -> dict[str, dict]:
    """``dataset_info.json`` entries, one per file: pre-training text in the ``prompt`` column."""
    info: dict[str, dict] = {}
    for d in datasets:
        name = f"tli_{len(info)}_{Path(d.path).stem}"
        if any(v["file_name"] == d.path for v in info.values()):
            continue
        info[name] = {"file_name": d.path, "columns": {"prompt": d.text_field if is_jsonl(d.path) else "text"}}
    return info


class LlamaFactory(TrainerFormat):
    name = "llamafactory"
    title = "LLaMA-Factory"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.dataset_info: dict[str, dict] = {}  # every stage's files, registered once under one name

    def refuse(self, spec: StageSpec, why: str) -> Refusal:
        return Refusal(
            f"llamafactory: stage '{spec.plan.name}': {why}; LLaMA-Factory cannot express this stage exactly, "
            "so no config is written (use the Axolotl config or tli-recipe train)"
        )

    def stage(self, spec: StageSpec) -> StageFiles:
        for d in resolve_datasets(spec, self.ctx.data):
            kind = record_format(d.path, d.text_field)
            if kind != "text":
                raise self.refuse(
                    spec,
                    f"{Path(d.path).name} holds {kind} records; the stage this config uses "
                    "(stage: pt) reads plain text, and chats or instructions need LLaMA-Factory's sft stage "
                    "with a template name for this model, which the plan does not know (render the data "
                    "to text first)",
                )
        names = self.register_datasets(spec)
        cfg = self.config(spec, names)
        target, merge = self.shown(spec), self.shown(spec, ".merge.yaml")
        run = f"llamafactory-cli train {target}" + (f" && llamafactory-cli export {merge}" if spec.plan.lora else "")
        extra = {}
        d = spec.plan.distributed
        if d.strategy == "fsdp":  # transformers' own TrainingArguments keys, which LLaMA-Factory's extend
            cfg.update(fsdp_arguments(d))
        elif d.strategy == "deepspeed":  # a path from the grown checkpoint's folder, where the commands run
            cfg["deepspeed"] = self.shown(spec, DEEPSPEED_SUFFIX)
            extra[f"{spec.file_stem}{DEEPSPEED_SUFFIX}"] = json.dumps(deepspeed_config(d), indent=2) + "\n"
        if spec.plan.lora:
            extra[Path(merge).name] = (
                f"# Merge the LoRA adapter of stage '{spec.plan.name}' into {cfg['output_dir']}/merged\n"
                "# (paths relative to the grown checkpoint's folder: run from there)\n"
                f"# Run: llamafactory-cli export {merge}\n" + dump_yaml(self.merge_config(spec))
            )
        return StageFiles(cfg, run, extra)

    def notes(self, spec: StageSpec) -> list[str]:
        how = "set bf16: false here, or run `llamafactory-cli train FILE bf16=false` (its command line overrides keys)"
        return {
            "auto": [
                "Precision: auto -> bf16: true: LLaMA-Factory takes only true or false here (transformers'",
                "TrainingArguments; no auto), and it trains on GPUs, nearly all of which have bfloat16. On a CPU or a",
                "GPU without bfloat16 (it refuses bf16 there) train in float32: " + how + ".",
            ],
            "bfloat16": [
                "Precision: bf16: true needs a GPU with bfloat16: LLaMA-Factory takes only true or false here",
                "(transformers' TrainingArguments; no auto), and refuses bf16 on a CPU. Precision off (float32):",
                how + ".",
            ],
            "float16": [
                "Precision: fp16: true needs a CUDA GPU. Precision off (float32): set fp16: false, or run",
                "`llamafactory-cli train FILE fp16=false`.",
            ],
            "float32": ["Precision: float32 (bf16 and fp16 off). On a GPU with bfloat16: bf16: true."],
        }[spec.settings.precision]

    def folder_files(self) -> dict[str, str]:
        return {"dataset_info.json": json.dumps(self.dataset_info, indent=2) + "\n"} if self.dataset_info else {}

    def register_datasets(self, spec: StageSpec) -> list[str]:
        """The dataset_info names of the stage's files (a file another stage registered keeps its name)."""
        names = []
        # LLaMA-Factory joins file_name to dataset_dir, the folder of dataset_info.json.
        here = [
            SettingsDataset(path=os.path.relpath(d.path, self.ctx.shown), text_field=d.text_field)
            for d in resolve_datasets(spec, self.ctx.data)
        ]
        for key, entry in llamafactory_dataset_info(here).items():
            same = [k for k, v in self.dataset_info.items() if v == entry]
            if not same:
                self.dataset_info[key] = entry
            names.append(same[0] if same else key)
        return names

    def config(self, spec: StageSpec, dataset_names: list[str]) -> dict:
        s, model_dir, seed = spec.settings, self.ctx.model_dir, self.ctx.plan.seed
        cfg: dict = {
            "model_name_or_path": self.ctx.rel(stage_input(model_dir, self.ctx.specs, spec, self.name)),
            "stage": "pt",
            "do_train": True,
            **self.selection(spec),
        }
        if dataset_names:
            cfg.update({"dataset": ",".join(dataset_names), "dataset_dir": self.ctx.rel(self.ctx.shown)})
        cfg.update(
            {
                "cutoff_len": s.sequence_length,
                "packing": True,
                "output_dir": self.ctx.rel(stage_dir(model_dir, spec.plan.name, self.name)),
                **mapped(s, seed, CHECKPOINT_KEYS),
                "plot_loss": True,
                **mapped(s, seed, TRAINING_KEYS),
            }
        )
        if s.validation_fraction > 0 and dataset_names:
            validation = mapped(s, seed, VALIDATION_KEYS)
            cfg.update({k: validation[k] for k in ("val_size", "per_device_eval_batch_size")})
            cfg.update({"eval_strategy": "steps", "eval_steps": validation["eval_steps"]})
        cfg.update({"seed": seed, "report_to": "none"})
        return cfg

    def merge_config(self, spec: StageSpec) -> dict:
        """``llamafactory-cli export`` settings that merge a LoRA stage's adapter into ``<output_dir>/merged``."""
        model_dir = self.ctx.model_dir
        out = stage_dir(model_dir, spec.plan.name, self.name)
        return {
            "model_name_or_path": self.ctx.rel(stage_input(model_dir, self.ctx.specs, spec, self.name)),
            "adapter_name_or_path": self.ctx.rel(out),
            "finetuning_type": "lora",
            "export_dir": self.ctx.rel(out / "merged"),
            "export_size": 5,
            "export_legacy_format": False,
        }

    def selection(self, spec: StageSpec) -> dict:
        """The fine-tuning keys that select exactly the stage's parameters, or a Refusal."""
        if self.ctx.plan.decoder_config_path:  # a VLM: the decoder nests inside the config
            raise self.refuse(
                spec,
                "LLaMA-Factory applies its own module rules to multimodal checkpoints, which this check does not model",
            )
        if spec.plan.lora is not None:
            return self.lora_selection(spec)
        moe = [g for g in ("router", "experts") if g in spec.settings.trainable]
        if moe and set(spec.plan.parameters) != set(tensor_names(self.ctx.plan)):
            raise self.refuse(
                spec,
                f"it trains the MoE group{'s' * (len(moe) > 1)} {', '.join(moe)}: LLaMA-Factory "
                "selects whole layers (freeze_trainable_layers) and top-level modules of a layer, "
                "never the routers or experts alone",
            )
        if set(spec.plan.parameters) == set(tensor_names(self.ctx.plan)):
            return {"finetuning_type": "full"}
        return self.freeze_selection(spec)

    def lora_selection(self, spec: StageSpec) -> dict:
        self.check_frozen_injected(spec)
        sp, names, num_layers = spec.plan, tensor_names(self.ctx.plan), len(self.ctx.plan.layers)
        keys = {
            "finetuning_type": "lora",
            "lora_rank": sp.lora.r,
            "lora_alpha": integer_alpha(spec, self.name),
            "lora_dropout": sp.lora.dropout,
            "lora_target": ",".join(sp.lora.targets),
        }
        wanted = {p[: -len(".weight")] for p in sp.parameters}
        if sp.lora.layers == list(range(num_layers)):
            got = llamafactory_lora_modules(names, sp.lora.targets, None)
        else:
            pro = [o for o in layer_options(sp.lora.layers, num_layers) if o.get("use_llama_pro")]
            if not pro:
                raise self.refuse(
                    spec,
                    f"LoRA on output layers {sp.lora.layers}: LLaMA-Factory puts adapters on every "
                    f"layer, or (use_llama_pro) on evenly spaced layers range(stride - 1, {num_layers}, "
                    f"stride) with stride = {num_layers} // N, which never equals this list",
                )
            keys.update(pro[0])
            got = llamafactory_lora_modules(names, sp.lora.targets, layer_ids(pro[0], num_layers))
        if got != wanted:
            extra = sorted(got - wanted) or sorted(wanted - got)
            raise self.refuse(
                spec,
                f"its substring matching would put adapters on {len(got)} modules, the stage names "
                f"{len(wanted)} (first difference: {extra[0]})",
            )
        if spec.settings.lora is not None and spec.settings.lora.quantize:
            keys["quantization_bit"] = spec.settings.lora.quantize
        return keys

    def freeze_selection(self, spec: StageSpec) -> dict:
        sp, plan = spec.plan, self.ctx.plan
        names, num_layers = tensor_names(plan), len(plan.layers)
        head, tail = layer_prefix(plan)
        in_layer = re.compile(re.escape(head) + r"\d+" + re.escape(tail))
        loose = [p for p in sp.parameters if not in_layer.match(p)]
        extra = sorted({p.split(".")[-2] for p in loose})
        layers = sp.trainable_layers
        options = layer_options(layers, num_layers) if layers else [{"freeze_trainable_layers": 0}]
        if not options:
            injected = sp.trainable_layers == plan.requires_grad_layers
            raise self.refuse(
                spec,
                f"output layers {layers}{' (the injected layers)' if injected else ''} are neither "
                f"the first N, the last N, nor LLaMA Pro's evenly spaced range(stride - 1, "
                f"{num_layers}, stride) with stride = {num_layers} // N for an N dividing {num_layers}",
            )
        wanted = set(sp.parameters)
        for option in options:
            got = llamafactory_freeze_selects(names, layer_ids(option, num_layers), extra)
            if got == wanted:
                keys = {"finetuning_type": "freeze", **option, "freeze_trainable_modules": "all"}
                if extra:
                    keys["freeze_extra_modules"] = ",".join(extra)
                return keys
        surplus = sorted(got - wanted)
        raise self.refuse(
            spec,
            f"its substring matching would also train {len(surplus)} tensors outside the stage "
            f"(first: {surplus[0]}; freeze_extra_modules {','.join(extra)} match anywhere in a name)"
            if surplus
            else "its matching misses some of the stage's tensors",
        )
