"""Axolotl configs: its regex rules for ``unfrozen_parameters``, and the stage config.

Axolotl matches each ``unfrozen_parameters`` pattern with ``re.match`` after rewriting
every ``.`` not followed by ``+`` into ``\\.`` (``axolotl.utils.freeze.LayerNamePattern``).
Every emitted selection is checked against that rule on the plan's tensor names.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan
from tli_recipe.training.data import is_jsonl, record_format
from tli_recipe.training.distributed import DEEPSPEED_SUFFIX, axolotl_fsdp, deepspeed_config
from tli_recipe.training.fields import Key, is_fp16, mapped, reentrancy
from tli_recipe.training.stages import (
    StageFiles,
    StageSpec,
    TrainerFormat,
    integer_alpha,
    layer_prefix,
    loaded_name_map,
    resolve_datasets,
    stage_dir,
    stage_input,
    tensor_names,
)

#: Axolotl turns on its fused LoRA kernels (Triton, CUDA only) unless one of these is set; False keeps a LoRA
#: config runnable without a GPU (the header says how to turn them on).
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")

#: Hyperparameters after the selection, in the order Axolotl configs list them.
TRAINING_KEYS = (
    Key("learning_rate", "learning_rate"),
    Key("scheduler", "lr_scheduler"),
    Key("warmup_steps", "warmup_steps"),
    Key("optimizer", "optimizer"),
    Key("weight_decay", "weight_decay"),
    Key("batch_size", "micro_batch_size"),
    Key("gradient_accumulation", "gradient_accumulation_steps"),
    Key("max_steps", "max_steps"),
    Key("epochs", "num_epochs"),
    Key("precision", "bf16", lambda p: "auto" if p in ("auto", "bfloat16") else False),
    # False, not absent: with bf16 auto on a machine without bfloat16, Axolotl would turn fp16 on instead.
    Key("precision", "fp16", is_fp16),
    Key("gradient_checkpointing", "gradient_checkpointing"),
    Key("gradient_checkpointing", "gradient_checkpointing_kwargs", reentrancy),
    Key("logging_steps", "logging_steps"),
    Key("save_steps", "save_steps"),
    Key("save_total_limit", "save_total_limit"),
    Key("seed", "seed"),
    Key("eval_steps", "eval_steps"),
)


def axolotl_literal(text: str) -> str:
    """A regex matching ``text`` literally, in Axolotl's dialect.

    Axolotl rewrites every ``.`` not followed by ``+`` into ``\\.`` before compiling, so a
    dot must be written bare (an escaped ``\\.`` would become ``\\\\.``); everything else is
    escaped as usual.
    """
    return "".join(c if c == "." else re.escape(c) for c in text)


def axolotl_patterns(plan: Plan, parameters: Iterable[str]) -> list[str]:
    """``unfrozen_parameters`` selecting exactly ``parameters`` among the plan's tensor names.

    Axolotl matches each pattern with ``re.match`` (anchored at the start only), so each
    pattern starts with ``^`` and ends at a dot after the layer index, or with ``$``.
    Layers trained whole share one pattern: ``^model.layers.(4|9|14).``. Where transformers (>= 5)
    renames tensors when it loads the model (MoE routers, experts fused per layer), the patterns
    also select the loaded names, so the config is exact with either naming.
    """
    head, tail = layer_prefix(plan)
    chosen = set(parameters)
    patterns = _patterns(head, tail, tensor_names(plan), chosen)
    renamed = loaded_name_map(plan)
    if renamed:
        loaded = list(dict.fromkeys(renamed.get(n, n) for n in tensor_names(plan)))
        patterns += [p for p in _patterns(head, tail, loaded, {renamed.get(n, n) for n in chosen}) if p not in patterns]
    return patterns


def _patterns(head: str, tail: str, names: list[str], chosen: set[str]) -> list[str]:
    layer_re = re.compile("^" + re.escape(head) + r"(0|[1-9][0-9]*)" + re.escape(tail) + "(.+)$")
    by_layer: dict[int, set[str]] = {}
    every: dict[int, set[str]] = {}
    loose: list[str] = []
    for name in names:
        match = layer_re.match(name)
        if match is None:
            if name in chosen:
                loose.append(name)
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        every.setdefault(layer, set()).add(suffix)
        if name in chosen:
            by_layer.setdefault(layer, set()).add(suffix)
    whole = sorted(i for i, suffixes in by_layer.items() if suffixes == every[i])
    patterns = []
    if whole:
        patterns.append("^" + axolotl_literal(head) + "(" + "|".join(map(str, whole)) + ")" + axolotl_literal(tail))
    for i in sorted(set(by_layer) - set(whole)):
        patterns += ["^" + axolotl_literal(f"{head}{i}{tail}{s}") + "$" for s in sorted(by_layer[i])]
    patterns += ["^" + axolotl_literal(n) + "$" for n in loose]
    return patterns


def axolotl_selects(patterns: Iterable[str], name: str) -> bool:
    """Axolotl's rule (``axolotl.utils.freeze.LayerNamePattern``): dots literal except in ``.+``, ``re.match``."""
    return any(re.match(re.sub(r"\.(?!\+)", r"\\.", p), name) for p in patterns)


class Axolotl(TrainerFormat):
    name = "axolotl"
    title = "Axolotl"

    def stage(self, spec: StageSpec) -> StageFiles:
        target = self.shown(spec)
        run = f"axolotl train {target}" + (f" && axolotl merge-lora {target}" if spec.plan.lora else "")
        config, extra = self.config(spec), {}
        d = spec.plan.distributed
        if d.strategy == "fsdp":
            config.update(axolotl_fsdp(d))
        elif d.strategy == "deepspeed":  # a path from the grown checkpoint's folder, where the commands run
            config["deepspeed"] = self.shown(spec, DEEPSPEED_SUFFIX)
            extra[f"{spec.file_stem}{DEEPSPEED_SUFFIX}"] = json.dumps(deepspeed_config(d), indent=2) + "\n"
        return StageFiles(config, run, extra)

    def notes(self, spec: StageSpec) -> list[str]:
        notes = {
            "auto": [
                "Precision: auto -> bf16: auto: bfloat16 where the GPU has it and float32 elsewhere (CPU, older GPUs);",
                "fp16: false keeps Axolotl from falling back to float16. Precision off: bf16: false.",
            ],
            "bfloat16": [
                "Precision: bf16: auto trains in bfloat16 where the GPU has it and in float32 elsewhere (CPU,",
                "older GPUs); fp16: false keeps Axolotl from falling back to float16. Precision off: bf16: false.",
            ],
            "float16": ["Precision: fp16: true needs a CUDA GPU. Precision off (float32): fp16: false."],
            "float32": ["Precision: float32 (bf16 and fp16 off). On a GPU with bfloat16: bf16: auto."],
        }[spec.settings.precision]
        if spec.plan.lora is not None:
            notes += [
                "LoRA kernels: Axolotl's fused LoRA kernels are Triton code that needs a CUDA GPU, so they are off",
                f"({', '.join(LORA_KERNELS)}: false); on a CUDA GPU set them to true to train faster.",
            ]
        return notes

    def config(self, spec: StageSpec) -> dict:
        plan, s, sp, model_dir = self.ctx.plan, spec.settings, spec.plan, self.ctx.model_dir
        cfg: dict = {
            "base_model": self.ctx.rel(stage_input(model_dir, self.ctx.specs, spec, self.name)),
            "output_dir": self.ctx.rel(stage_dir(model_dir, sp.name, self.name)),
            "datasets": [self.dataset(d) for d in resolve_datasets(spec, self.ctx.data)],
            "sequence_len": s.sequence_length,
            "sample_packing": True,
            "pad_to_sequence_len": True,
            "attn_implementation": "sdpa",  # keeps packed documents apart (Axolotl warns without a backend that does)
            "val_set_size": s.validation_fraction,
        }
        if not cfg["datasets"]:
            del cfg["datasets"]
        elif any(d["type"] == "alpaca" for d in cfg["datasets"]):
            cfg["train_on_inputs"] = True  # the loss covers the prompts too, as tli-recipe train's does
        cfg.update(self.lora(spec) if sp.lora is not None else self.selection(spec))
        cfg.update(mapped(s, plan.seed, TRAINING_KEYS))
        return cfg

    def dataset(self, d) -> dict:
        """One file: raw text as completion, chats with the model's chat template (every role trains, so the
        loss covers the whole rendered text, as in tli-recipe train), instructions in Alpaca's format."""
        kind = record_format(d.path, d.text_field)
        path = self.ctx.rel(d.path)
        if kind == "chat":
            return {
                "path": path,
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["system", "user", "assistant"],
                "train_on_eos": "all",
            }
        if kind == "instruction":
            return {"path": path, "ds_type": "json", "type": "alpaca"}
        return {
            "path": path,
            "ds_type": "json" if is_jsonl(d.path) else "text",
            "type": "completion",
            "field": d.text_field,
        }

    def lora(self, spec: StageSpec) -> dict:
        self.check_frozen_injected(spec)
        sp, quantize = spec.plan, spec.settings.lora.quantize if spec.settings.lora is not None else None
        keys: dict = {
            "adapter": "qlora" if quantize == 4 else "lora",
            "lora_r": sp.lora.r,
            "lora_alpha": integer_alpha(spec, self.name),
            "lora_dropout": sp.lora.dropout,
            "lora_target_modules": list(sp.lora.targets),
        }
        if sp.lora.layers != [e.output for e in self.ctx.plan.layers]:
            keys["peft_layers_to_transform"] = list(sp.lora.layers)
        if quantize:
            keys[f"load_in_{quantize}bit"] = True
        keys.update(dict.fromkeys(LORA_KERNELS, False))
        return keys

    def selection(self, spec: StageSpec) -> dict:
        """``unfrozen_parameters`` for a full-weight stage (none when every tensor trains)."""
        names, sp = tensor_names(self.ctx.plan), spec.plan
        if set(sp.parameters) == set(names):
            return {}
        patterns = axolotl_patterns(self.ctx.plan, sp.parameters)
        selected = {n for n in names if axolotl_selects(patterns, n)}
        renamed = loaded_name_map(self.ctx.plan)
        if renamed:  # the loaded names too: exactly the stage's, with no checkpoint name's pattern reaching others
            loaded = {renamed.get(n, n) for n in names}
            if {n for n in loaded if axolotl_selects(patterns, n)} != {renamed.get(n, n) for n in sp.parameters}:
                selected = set()  # pragma: no cover - a bug in axolotl_patterns
        if selected != set(sp.parameters):  # pragma: no cover - a bug in axolotl_patterns
            raise TliError(
                f"axolotl: stage '{sp.name}': the patterns select {len(selected)} tensors, the stage "
                f"{len(sp.parameters)}; please report this"
            )
        return {"unfrozen_parameters": patterns}
