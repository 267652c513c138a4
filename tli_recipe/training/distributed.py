"""A stage's ``distributed`` setting (ddp, fsdp, deepspeed) as each trainer spells it. Pure data, no torch.

- **ddp**: nothing to write; the launcher's processes each hold the whole model.
- **fsdp**: FSDP2 (``fully_shard``; transformers' ``fsdp_config`` version 2), each decoder layer wrapped on its
  own (the model's ``_no_split_modules``), parameters resharded after the forward pass. FSDP2 shards every
  parameter on its own, so frozen and trainable parameters may share a wrapped layer (an injected-only or a
  LoRA stage); FSDP1's flat parameters would need each layer all-frozen or all-trainable.
- **deepspeed**: a ZeRO-2 or ZeRO-3 JSON with ``auto`` values that the Hugging Face integration fills in from
  the TrainingArguments (batch sizes, precision, clipping), so it cannot disagree with them. ZeRO keeps
  optimizer state only for the parameters that train.
"""

from __future__ import annotations

from typing import Any

from tli_recipe.plan.model import DistributedPlan

#: The file a stage's DeepSpeed JSON is written to, beside the stage config (Axolotl, LLaMA-Factory).
DEEPSPEED_SUFFIX = ".deepspeed.json"


def deepspeed_config(d: DistributedPlan) -> dict[str, Any]:
    """The DeepSpeed JSON of a ``deepspeed`` stage (ZeRO ``d.zero_stage``, CPU offload when ``d.offload``)."""
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if d.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # the saved model is whole (a checkpoint the next stage and transformers can load)
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if d.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def fsdp_arguments(d: DistributedPlan) -> dict[str, Any]:
    """``fsdp`` and ``fsdp_config`` of transformers' TrainingArguments (the built-in trainer, LLaMA-Factory)
    for an ``fsdp`` stage: FSDP2, full sharding, each decoder layer its own unit."""
    return {
        "fsdp": "full_shard auto_wrap" + (" offload" if d.offload else ""),
        "fsdp_config": {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"},
    }


def axolotl_fsdp(d: DistributedPlan) -> dict[str, Any]:
    """Axolotl's keys for an ``fsdp`` stage (its ``fsdp_config`` schema; the layer class is the model's
    ``_no_split_modules``, accelerate's default)."""
    return {
        "fsdp_version": 2,
        "fsdp_config": {
            "offload_params": d.offload,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }
