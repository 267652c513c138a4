"""Plan -> one training config per stage and trainer: Axolotl, LLaMA-Factory, and tli-recipe's own (HF/TRL).

Pure data and YAML; no torch. The plan's resolved stages are the single source of
truth: which parameter names train comes from ``StagePlan.parameters`` and
``StagePlan.lora``, the hyperparameters from the recipe's stage. Every emitted
selection is checked against the trainer's own matching rule on the plan's tensor
names before it is written; a trainer that cannot express a stage exactly gets a
:class:`Refusal` (why, and what would work), never an approximate config.

Stages chain: stage 1 starts from the grown checkpoint, stage k from stage k-1's
output (for a LoRA stage, its merged output). Stage outputs are siblings of the
model directory: ``<model>-<stage>`` (built-in trainer), ``<model>-<stage>-axolotl``,
``<model>-<stage>-llamafactory``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import yaml

from tli_recipe._version import __version__
from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan, StagePlan
from tli_recipe.recipe.schema import LINEAR_PROJECTIONS, Dataset, Recipe, Stage

TRAINERS: tuple[str, ...] = ("axolotl", "llamafactory", "trl")
#: Init policies (as the plan prints them) after which a projection's output is exactly zero.
#: The HF scheduler of each recipe schedule, without and with warmup.
SCHEDULERS = {"cosine": ("cosine", "cosine"), "linear": ("linear", "linear"), "constant": ("constant", "constant_with_warmup")}


class Refusal(TliError):
    """A trainer cannot express a stage exactly; the message says why and what would work."""


@dataclass(frozen=True)
class StageSpec:
    """One stage: its position (1-based), what the plan resolved, and the recipe's settings."""

    index: int
    plan: StagePlan
    settings: Stage

    @property
    def file_stem(self) -> str:
        return f"{self.index:02d}-{self.plan.name}"


def stage_specs(plan: Plan) -> list[StageSpec]:
    """The plan's stages with their recipe settings (defaults filled in)."""
    recipe = Recipe.model_validate(plan.recipe)
    by_name = {s.name: s for s in recipe.stages}
    return [StageSpec(i, sp, by_name[sp.name]) for i, sp in enumerate(plan.stages, 1)]


def select_stages(specs: list[StageSpec], names: Optional[Sequence[str]]) -> list[StageSpec]:
    if not names:
        return specs
    known = [s.plan.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        from tli_recipe.errors import did_you_mean

        raise TliError(f"--stage {unknown[0]}: no such stage{did_you_mean(unknown[0], known)}; "
                       f"the plan's stages: {', '.join(known) or 'none (add stages to the recipe)'}")
    return [s for s in specs if s.plan.name in names]


# --- where stages read and write -----------------------------------------------------------

def stage_dir(model_dir: Path, stage: str, trainer: str = "trl", into: Optional[Path] = None) -> Path:
    """Output directory of a stage: a sibling of the model directory (or ``into/<stage>``)."""
    if into is not None:
        return Path(into) / stage
    suffix = "" if trainer == "trl" else f"-{trainer}"
    return model_dir.parent / f"{model_dir.name}-{stage}{suffix}"


def stage_input(model_dir: Path, specs: list[StageSpec], spec: StageSpec, trainer: str = "trl",
                into: Optional[Path] = None) -> Path:
    """The checkpoint a stage starts from: the grown model, or the previous stage's (merged) output."""
    if spec.index == 1:
        return model_dir
    previous = specs[spec.index - 2]
    out = stage_dir(model_dir, previous.plan.name, trainer, into)
    # Axolotl and LLaMA-Factory keep the adapter in output_dir and write the merged model below it.
    return out / "merged" if previous.plan.lora is not None and trainer != "trl" else out


def resolve_datasets(spec: StageSpec, data: Optional[Sequence[str | Path]] = None) -> list[Dataset]:
    """The stage's datasets (or ``data``, which replaces them), with absolute paths."""
    chosen = [Dataset(path=str(p)) for p in data] if data else list(spec.settings.datasets)
    return [Dataset(path=str(Path(d.path).expanduser().resolve()), text_field=d.text_field) for d in chosen]


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


# --- checks every trainer shares -------------------------------------------------------------

def frozen_injected_problem(plan: Plan, spec: StageSpec) -> Optional[str]:
    """Why a LoRA stage can never move the injected layers it names, or None.

    In an injected layer whose o_proj and down_proj are zero (or whose output norm gain
    is zero), the block's output is exactly 0, so adapters on every other projection get
    no gradient (METHODS.md section 3). The recipe may say this is intended.
    """
    lora = spec.plan.lora
    if lora is None or (spec.settings.lora is not None and spec.settings.lora.allow_frozen_injected):
        return None
    from tli_recipe.plan.stages import unmoved_injected

    earlier = plan.stages[:[s.name for s in plan.stages].index(spec.plan.name)]
    injected, missing = unmoved_injected(earlier, list(lora.layers), list(lora.targets), plan.tensors, plan.init,
                                         plan.requires_grad_layers)
    if not injected:
        return None
    linear = [p for p in missing if p in LINEAR_PROJECTIONS]
    fix = (f"add {', '.join(linear)} to lora.targets, or " if linear == missing else
           f"LoRA cannot adapt {', '.join(p for p in missing if p not in linear)}, so ")
    return (f"stage '{spec.plan.name}': LoRA targets {', '.join(lora.targets)} leave out {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} zero in the injected layers {injected}: those blocks output exactly 0, "
            "so adapters on their other projections get no gradient and the injected layers never move. To fix it, "
            f"{fix}train the injected layers fully in an earlier stage; or set lora.allow_frozen_injected: true if "
            "this is intended")


def _integer_alpha(spec: StageSpec, trainer: str) -> int:
    alpha = spec.plan.lora.alpha  # type: ignore[union-attr]
    if alpha != int(alpha):
        raise Refusal(f"{trainer}: stage '{spec.plan.name}': lora.alpha {alpha:g} is not an integer and {trainer} "
                      "takes an integer lora_alpha; use an integer alpha, or the built-in trainer (tli-recipe train)")
    return int(alpha)


def _layer_prefix(plan: Plan) -> tuple[str, str]:
    """The architecture's layer prefix split at ``{layer}``: ``("model.layers.", ".")``."""
    head, _, tail = plan.layer_prefix.partition("{layer}")
    return head, tail


def _names(plan: Plan) -> list[str]:
    return [op.name for op in plan.tensors]


# --- Axolotl -------------------------------------------------------------------------------------

def _axolotl_literal(text: str) -> str:
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
    Layers trained whole share one pattern: ``^model.layers.(4|9|14).``.
    """
    head, tail = _layer_prefix(plan)
    layer_re = re.compile("^" + re.escape(head) + r"(0|[1-9][0-9]*)" + re.escape(tail) + "(.+)$")
    chosen = set(parameters)
    by_layer: dict[int, set[str]] = {}
    every: dict[int, set[str]] = {}
    loose: list[str] = []
    for name in _names(plan):
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
        patterns.append("^" + _axolotl_literal(head) + "(" + "|".join(map(str, whole)) + ")" + _axolotl_literal(tail))
    for i in sorted(set(by_layer) - set(whole)):
        patterns += ["^" + _axolotl_literal(f"{head}{i}{tail}{s}") + "$" for s in sorted(by_layer[i])]
    patterns += ["^" + _axolotl_literal(n) + "$" for n in loose]
    return patterns


def axolotl_selects(patterns: Iterable[str], name: str) -> bool:
    """Axolotl's rule (``axolotl.utils.freeze.LayerNamePattern``): dots literal except in ``.+``, ``re.match``."""
    return any(re.match(re.sub(r"\.(?!\+)", r"\\.", p), name) for p in patterns)


def axolotl_config(plan: Plan, specs: list[StageSpec], spec: StageSpec, model_dir: Path,
                   data: Optional[Sequence[str | Path]] = None) -> dict:
    s, sp = spec.settings, spec.plan
    out = stage_dir(model_dir, sp.name, "axolotl")
    cfg: dict = {
        "base_model": str(stage_input(model_dir, specs, spec, "axolotl")),
        "output_dir": str(out),
        "datasets": [{"path": d.path, "ds_type": "json" if is_jsonl(d.path) else "text", "type": "completion",
                      "field": d.text_field} for d in resolve_datasets(spec, data)],
        "sequence_len": s.sequence_length,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "attn_implementation": "sdpa",  # keeps packed documents apart (Axolotl warns without a backend that does)
        "val_set_size": s.validation_fraction,
    }
    if not cfg["datasets"]:
        del cfg["datasets"]
    if sp.lora is not None:
        problem = frozen_injected_problem(plan, spec)
        if problem:
            raise Refusal(f"axolotl: {problem}")
        cfg.update({
            "adapter": "qlora" if sp.lora and s.lora and s.lora.quantize == 4 else "lora",
            "lora_r": sp.lora.r,
            "lora_alpha": _integer_alpha(spec, "axolotl"),
            "lora_dropout": sp.lora.dropout,
            "lora_target_modules": list(sp.lora.targets),
        })
        if sp.lora.layers != [e.output for e in plan.layers]:
            cfg["peft_layers_to_transform"] = list(sp.lora.layers)
        if s.lora is not None and s.lora.quantize:
            cfg[f"load_in_{s.lora.quantize}bit"] = True
    elif set(sp.parameters) != set(_names(plan)):
        patterns = axolotl_patterns(plan, sp.parameters)
        selected = {n for n in _names(plan) if axolotl_selects(patterns, n)}
        if selected != set(sp.parameters):  # pragma: no cover - a bug in axolotl_patterns
            raise TliError(f"axolotl: stage '{sp.name}': the patterns select {len(selected)} tensors, the stage "
                           f"{len(sp.parameters)}; please report this")
        cfg["unfrozen_parameters"] = patterns
    warm = SCHEDULERS[s.scheduler][s.warmup_steps > 0]
    cfg.update({
        "learning_rate": s.learning_rate,
        "lr_scheduler": warm,
        "warmup_steps": s.warmup_steps,
        "optimizer": "adamw_torch",
        "weight_decay": s.weight_decay,
        "micro_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation,
    })
    if s.max_steps is not None:
        cfg["max_steps"] = s.max_steps
    else:
        cfg["num_epochs"] = s.epochs or 1
    cfg.update({"bf16": s.precision == "bfloat16", "fp16": s.precision == "float16"})
    cfg["gradient_checkpointing"] = s.gradient_checkpointing
    if s.gradient_checkpointing:
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    cfg.update({"logging_steps": 1, "save_steps": s.save_steps, "save_total_limit": 2, "seed": plan.recipe.get("seed", 0)})
    if s.validation_fraction > 0:
        cfg["eval_steps"] = s.eval_steps
    return cfg


# --- LLaMA-Factory ---------------------------------------------------------------------------------

def _lf_layer_options(layers: list[int], num_layers: int) -> list[dict]:
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


def _lf_layer_ids(option: dict, num_layers: int) -> list[int]:
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


def llamafactory_lora_modules(names: Iterable[str], targets: Sequence[str], layer_ids: Optional[Iterable[int]]) -> set[str]:
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


def _lf_refuse(spec: StageSpec, why: str) -> Refusal:
    return Refusal(f"llamafactory: stage '{spec.plan.name}': {why}; LLaMA-Factory cannot express this stage exactly, "
                   "so no config is written (use the Axolotl config or tli-recipe train)")


def _lf_selection(plan: Plan, spec: StageSpec) -> dict:
    """The fine-tuning keys that select exactly the stage's parameters, or a Refusal."""
    sp = spec.plan
    names, num_layers = _names(plan), len(plan.layers)
    if "text_config" in plan.config or "vision_config" in plan.config:
        raise _lf_refuse(spec, "LLaMA-Factory applies its own module rules to multimodal checkpoints, which this check "
                               "does not model")
    if sp.lora is not None:
        problem = frozen_injected_problem(plan, spec)
        if problem:
            raise Refusal(f"llamafactory: {problem}")
        keys = {"finetuning_type": "lora", "lora_rank": sp.lora.r, "lora_alpha": _integer_alpha(spec, "llamafactory"),
                "lora_dropout": sp.lora.dropout, "lora_target": ",".join(sp.lora.targets)}
        wanted = {p[: -len(".weight")] for p in sp.parameters}
        if sp.lora.layers == list(range(num_layers)):
            got = llamafactory_lora_modules(names, sp.lora.targets, None)
        else:
            pro = [o for o in _lf_layer_options(sp.lora.layers, num_layers) if o.get("use_llama_pro")]
            if not pro:
                raise _lf_refuse(spec, f"LoRA on output layers {sp.lora.layers}: LLaMA-Factory puts adapters on every "
                                       f"layer, or (use_llama_pro) on evenly spaced layers range(stride - 1, {num_layers}, "
                                       f"stride) with stride = {num_layers} // N, which never equals this list")
            keys.update(pro[0])
            got = llamafactory_lora_modules(names, sp.lora.targets, _lf_layer_ids(pro[0], num_layers))
        if got != wanted:
            extra = sorted(got - wanted) or sorted(wanted - got)
            raise _lf_refuse(spec, f"its substring matching would put adapters on {len(got)} modules, the stage names "
                                   f"{len(wanted)} (first difference: {extra[0]})")
        if spec.settings.lora is not None and spec.settings.lora.quantize:
            keys["quantization_bit"] = spec.settings.lora.quantize
        return keys
    if set(sp.parameters) == set(names):
        return {"finetuning_type": "full"}
    head, tail = _layer_prefix(plan)
    layer_params = [p for p in sp.parameters if re.match(re.escape(head) + r"\d+" + re.escape(tail), p)]
    loose = [p for p in sp.parameters if p not in set(layer_params)]
    extra = sorted({p.split(".")[-2] for p in loose})
    layers = sp.trainable_layers
    options = _lf_layer_options(layers, num_layers) if layers else [{"freeze_trainable_layers": 0}]
    if not options:
        injected = sp.trainable_layers == plan.requires_grad_layers
        raise _lf_refuse(spec, f"output layers {layers}{' (the injected layers)' if injected else ''} are neither the "
                               f"first N, the last N, nor LLaMA Pro's evenly spaced range(stride - 1, {num_layers}, stride) "
                               f"with stride = {num_layers} // N for an N dividing {num_layers}")
    wanted = set(sp.parameters)
    for option in options:
        got = llamafactory_freeze_selects(names, _lf_layer_ids(option, num_layers), extra)
        if got == wanted:
            keys = {"finetuning_type": "freeze", **option, "freeze_trainable_modules": "all"}
            if extra:
                keys["freeze_extra_modules"] = ",".join(extra)
            return keys
    surplus = sorted(got - wanted)
    raise _lf_refuse(spec, f"its substring matching would also train {len(surplus)} tensors outside the stage (first: "
                           f"{surplus[0]}; freeze_extra_modules {','.join(extra)} match anywhere in a name)" if surplus
                     else "its matching misses some of the stage's tensors")


def llamafactory_config(plan: Plan, specs: list[StageSpec], spec: StageSpec, model_dir: Path, dataset_names: list[str],
                        dataset_dir: Path) -> dict:
    s = spec.settings
    cfg: dict = {"model_name_or_path": str(stage_input(model_dir, specs, spec, "llamafactory")),
                 "stage": "pt", "do_train": True, **_lf_selection(plan, spec)}
    if dataset_names:
        cfg.update({"dataset": ",".join(dataset_names), "dataset_dir": str(dataset_dir)})
    cfg.update({
        "cutoff_len": s.sequence_length,
        "packing": True,
        "output_dir": str(stage_dir(model_dir, spec.plan.name, "llamafactory")),
        "logging_steps": 1,
        "save_steps": s.save_steps,
        "save_total_limit": 2,
        "plot_loss": True,
        "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation,
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": SCHEDULERS[s.scheduler][s.warmup_steps > 0],
        "warmup_steps": s.warmup_steps,
        "weight_decay": s.weight_decay,
        "optim": "adamw_torch",
    })
    if s.max_steps is not None:
        cfg["max_steps"] = s.max_steps
    else:
        cfg["num_train_epochs"] = float(s.epochs or 1)
    cfg.update({"bf16": s.precision == "bfloat16", "fp16": s.precision == "float16"})
    # LLaMA-Factory turns gradient checkpointing on unless told otherwise.
    cfg["disable_gradient_checkpointing"] = not s.gradient_checkpointing
    if s.validation_fraction > 0 and dataset_names:
        cfg.update({"val_size": s.validation_fraction, "per_device_eval_batch_size": s.batch_size,
                    "eval_strategy": "steps", "eval_steps": s.eval_steps})
    cfg.update({"seed": plan.recipe.get("seed", 0), "report_to": "none"})
    return cfg


def llamafactory_merge_config(plan: Plan, specs: list[StageSpec], spec: StageSpec, model_dir: Path) -> dict:
    """``llamafactory-cli export`` settings that merge a LoRA stage's adapter into ``<output_dir>/merged``."""
    out = stage_dir(model_dir, spec.plan.name, "llamafactory")
    return {"model_name_or_path": str(stage_input(model_dir, specs, spec, "llamafactory")), "adapter_name_or_path": str(out),
            "finetuning_type": "lora", "export_dir": str(out / "merged"), "export_size": 5, "export_legacy_format": False}


def llamafactory_dataset_info(datasets: list[Dataset]) -> dict[str, dict]:
    """``dataset_info.json`` entries, one per file: pre-training text in the ``prompt`` column."""
    info = {}
    for d in datasets:
        name = f"tli_{len(info)}_{Path(d.path).stem}"
        if any(v["file_name"] == d.path for v in info.values()):
            continue
        info[name] = {"file_name": d.path, "columns": {"prompt": d.text_field if is_jsonl(d.path) else "text"}}
    return info


# --- the built-in trainer (Hugging Face Trainer / TRL) ----------------------------------------------

def training_arguments(plan: Plan, spec: StageSpec) -> dict:
    """Keyword arguments of ``transformers.TrainingArguments`` (also valid for TRL's ``SFTConfig``), less output_dir."""
    s = spec.settings
    args: dict = {
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": SCHEDULERS[s.scheduler][s.warmup_steps > 0],
        "warmup_steps": s.warmup_steps,
        "per_device_train_batch_size": s.batch_size,
        "per_device_eval_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation,
        "weight_decay": s.weight_decay,
        "optim": "adamw_torch",
        "bf16": s.precision == "bfloat16",
        "fp16": s.precision == "float16",
    }
    if s.max_steps is not None:
        args["max_steps"] = s.max_steps
    else:
        args["num_train_epochs"] = float(s.epochs or 1)
    if s.gradient_checkpointing:  # (renamed activation_checkpointing in recent transformers; train() translates)
        args.update({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    args.update({
        "logging_steps": 1,
        "logging_first_step": True,
        "eval_strategy": "steps" if s.validation_fraction > 0 else "no",
        "save_strategy": "steps",
        "save_steps": s.save_steps,
        "save_total_limit": 2,
        "seed": plan.recipe.get("seed", 0),
        "report_to": "none",
    })
    if s.validation_fraction > 0:
        args["eval_steps"] = s.eval_steps
    return args


def trl_config(plan: Plan, specs: list[StageSpec], spec: StageSpec, model_dir: Path,
               data: Optional[Sequence[str | Path]] = None, into: Optional[Path] = None) -> dict:
    """The built-in trainer's stage config: what to load, which names train, and the TrainingArguments."""
    sp = spec.plan
    problem = frozen_injected_problem(plan, spec)
    if problem:
        raise Refusal(problem)
    lora = None
    if sp.lora is not None:
        head, _ = _layer_prefix(plan)
        lora = {"r": sp.lora.r, "alpha": sp.lora.alpha, "dropout": sp.lora.dropout, "targets": list(sp.lora.targets),
                "layers": list(sp.lora.layers), "layers_pattern": head.rstrip(".").split(".")[-1],
                "all_layers": sp.lora.layers == [e.output for e in plan.layers],
                "quantize": spec.settings.lora.quantize if spec.settings.lora is not None else None}
    return {
        "stage": sp.name,
        "index": spec.index,
        "stages": len(specs),
        "plan": str(model_dir / "plan.json"),
        "model": str(stage_input(model_dir, specs, spec, "trl", into)),
        "output_dir": str(stage_dir(model_dir, sp.name, "trl", into)),
        "datasets": [d.model_dump() for d in resolve_datasets(spec, data)],
        "sequence_length": spec.settings.sequence_length,
        "validation_fraction": spec.settings.validation_fraction,
        "trainable_parameters": list(sp.parameters),
        "lora": lora,
        "training_arguments": training_arguments(plan, spec),
    }


# --- writing ---------------------------------------------------------------------------------------

def _header(plan: Plan, spec: StageSpec, trainer: str, run: str) -> str:
    sp = spec.plan
    what = (f"LoRA r={sp.lora.r} on {', '.join(sp.lora.targets)} of output layers {ranges(sp.lora.layers)}"
            if sp.lora else f"full weights of {len(sp.parameters)} tensors (output layers {ranges(sp.trainable_layers)}"
            + (f" + {', '.join(sp.trainable_groups)}" if sp.trainable_groups else "") + ")")
    return (f"# {trainer} config for stage {spec.index} '{sp.name}' of {plan.name}, written by tli-recipe {__version__}\n"
            f"# from plan.json (recipe sha256 {plan.recipe_sha256[:12]}): trains {what}.\n"
            f"# Run: {run}\n")


def ranges(values: list[int]) -> str:
    from tli_recipe.plan.report import ranges

    return ranges(values)


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=120)


def write_training_configs(plan: Plan, folder: Path, model_dir: Path, *, formats: Sequence[str] = TRAINERS,
                           stages: Optional[Sequence[str]] = None, data: Optional[Sequence[str | Path]] = None,
                           log: Optional[Callable[[str], None]] = None,
                           final_folder: Optional[Path] = None) -> tuple[list[Path], list[Refusal]]:
    """Write ``folder/<trainer>/NN-<stage>.yaml`` for each trainer and stage.

    ``final_folder``: where ``folder`` will be once `run` renames its temporary directory into
    place; the paths written inside the configs (commands, LLaMA-Factory's dataset_dir) use it.

    A stage a trainer cannot express gets ``NN-<stage>.refused.txt`` (the reason) instead;
    the refusals are returned, not raised, so that ``run`` always finishes. ``model_dir`` is
    where the grown checkpoint is (or will be); paths in the configs are absolute.
    """
    specs = stage_specs(plan)
    chosen = select_stages(specs, stages)
    if not chosen:
        return [], []
    model_dir = Path(model_dir).resolve()
    written: list[Path] = []
    refusals: list[Refusal] = []
    no_data = [s.plan.name for s in chosen if not resolve_datasets(s, data)]
    for trainer in formats:
        out = folder / trainer
        out.mkdir(parents=True, exist_ok=True)
        shown = Path(final_folder or folder).resolve() / trainer  # the path the configs will have
        commands = []
        dataset_info: dict[str, dict] = {}
        for spec in chosen:
            target = out / f"{spec.file_stem}.yaml"
            shown_target, shown_merge = shown / target.name, shown / f"{spec.file_stem}.merge.yaml"
            for stale in (target, out / f"{spec.file_stem}.refused.txt", out / f"{spec.file_stem}.merge.yaml",
                          out / f"{spec.file_stem}.parameters.txt"):
                stale.unlink(missing_ok=True)
            try:
                if trainer == "axolotl":
                    cfg = axolotl_config(plan, specs, spec, model_dir, data)
                    run = f"axolotl train {shown_target}" + (f" && axolotl merge-lora {shown_target}" if spec.plan.lora else "")
                    files = {target: _header(plan, spec, "Axolotl", run) + _dump(cfg)}
                elif trainer == "llamafactory":
                    info = llamafactory_dataset_info(resolve_datasets(spec, data))
                    names = []
                    for key, entry in info.items():
                        same = [k for k, v in dataset_info.items() if v == entry]
                        if not same:
                            dataset_info[key] = entry
                        names.append(same[0] if same else key)
                    cfg = llamafactory_config(plan, specs, spec, model_dir, names, shown)
                    merge = out / f"{spec.file_stem}.merge.yaml"
                    run = f"llamafactory-cli train {shown_target}" + (f" && llamafactory-cli export {shown_merge}" if spec.plan.lora else "")
                    files = {target: _header(plan, spec, "LLaMA-Factory", run) + _dump(cfg)}
                    if spec.plan.lora:
                        files[merge] = (f"# Merge the LoRA adapter of stage '{spec.plan.name}' into {cfg['output_dir']}/merged\n"
                                        f"# Run: llamafactory-cli export {shown_merge}\n"
                                        + _dump(llamafactory_merge_config(plan, specs, spec, model_dir)))
                else:
                    cfg = trl_config(plan, specs, spec, model_dir, data)
                    run = f"tli-recipe train {model_dir} --stage {spec.plan.name}   (or: tli-recipe train --config {shown_target})"
                    files = {target: _header(plan, spec, "tli-recipe (Hugging Face Trainer)", run) + _dump(cfg),
                             out / f"{spec.file_stem}.parameters.txt": "\n".join(spec.plan.parameters) + "\n"}
            except Refusal as refusal:
                refusals.append(refusal)
                (out / f"{spec.file_stem}.refused.txt").write_text(str(refusal) + "\n")
                commands.append(f"# stage {spec.index} '{spec.plan.name}': refused, see {spec.file_stem}.refused.txt")
                continue
            for path, text in files.items():
                path.write_text(text)
                written.append(path)
            commands.append(run)
        if trainer == "llamafactory" and dataset_info:
            (out / "dataset_info.json").write_text(json.dumps(dataset_info, indent=2) + "\n")
            written.append(out / "dataset_info.json")
        note = (f"\n# Stages {', '.join(no_data)} name no datasets: add `datasets` to the recipe's stage, or re-emit "
                f"with `tli-recipe emit {model_dir} --data FILE`.\n" if no_data else "")
        (out / "README.txt").write_text(f"# {trainer}: the stages of {plan.name}, in order.{note}\n" + "\n".join(commands) + "\n")
    if log:
        for refusal in refusals:
            log(f"note: {refusal}")
    return written, refusals
