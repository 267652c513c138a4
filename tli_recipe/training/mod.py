"""Mixture-of-Depths ensemble tuning (MoD, arXiv 2410.13077) on a transformers causal LM.

The last ``k`` decoder layers become an ensemble. For each of them, the exit
``e_i = lm_head(norm_i(h_i))`` reads the layer's output ``h_i`` (the residual stream) through a
new norm ``norm_i`` (a copy of the model's final norm) and the model's own head. A router gives
softmax weights ``w = softmax(W n(h_L) + b)`` over the ``k`` exits from the final hidden state
``n(h_L)`` (``n`` the model's final norm), and the logits are

    mixed = z + g * (sum_i w_i e_i - z)

with ``z`` the model's own logits and ``g`` a trained scalar gate. ``g = 1`` is the paper's
ensemble (``sum_i w_i e_i``); ``init: exact`` starts at ``g = 0``, so step 0 computes exactly the
model's logits (the effective weights ``1 - g + g w_k`` on the final layer and ``g w_i`` on the
others sum to 1 at every step). The loss is the cross-entropy of ``mixed`` plus ``distill_weight``
times the mean over the earlier exits of ``KL(p_z || p_{e_i})``, the final layer's distribution
(not trained through) to each earlier exit.

Nothing here patches transformers or needs ``trust_remote_code``: the head is a small module
beside the model, wired in with forward hooks (the layers' outputs are captured, the model's
logits replaced), so ``generate`` works as usual. It is saved beside the model as
``mod_head.safetensors``: tensors ``norms.{j}.weight`` (and ``.bias`` for LayerNorm) of exit ``j``
in layer order, ``router.weight`` ``[k, hidden]``, ``router.bias`` ``[k]``, ``gate`` ``[1]``;
metadata ``format: tli-recipe-mod``, ``version: 1``, ``layers`` (a JSON list of decoder layer
indices), ``distill_weight``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
from pathlib import Path
from typing import Optional

from tli_recipe.errors import TliError

HEAD_FILE = "mod_head.safetensors"
FORMAT, VERSION = "tli-recipe-mod", "1"


#: A head's metadata value longer than this is not one this tool wrote (a few hundred layers at most).
MAX_META_CHARS = 1 << 16
#: A trained gate stays near [0, 1]; far outside, the mixed logits are the exits' differences magnified.
MAX_GATE = 1e3


def has_mod_head(folder: str | Path) -> bool:
    """True when the folder has an entry named ``mod_head.safetensors`` (a link or a device too: then
    ``read_head`` refuses it, instead of the folder being scored without its head)."""
    return os.path.lexists(Path(folder) / HEAD_FILE)


def _parts(model):
    """(decoder layers, final norm, head) of a causal LM, or a TliError naming what is missing."""
    # compute_loss gets the model as the Trainer wrapped it for several processes (DDP's .module)
    model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    head = base.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise TliError(
            f"objective: mod needs a decoder with .layers and a final .norm and an output head; "
            f"{type(base).__name__} has "
            f"{'no layers' if layers is None else 'no final norm' if norm is None else 'no head'}"
        )
    return base, layers, norm, head


def new_head(model, layers: list[int], init: str = "exact"):
    """A MoD head over decoder ``layers`` of ``model``: exit norms copied from its final norm, a zero router."""
    import torch
    from torch import nn

    _, stack, norm, head = _parts(model)
    if len(layers) < 2 or any(not 0 <= i < len(stack) for i in layers) or layers != sorted(set(layers)):
        shown = ", ".join(map(str, layers[:8])) + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")
        raise TliError(f"a MoD head needs ascending decoder layers of the model (0-{len(stack) - 1}); got [{shown}]")
    hidden = head.weight.shape[1]

    class MoDHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = list(layers)
            self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in layers)
            self.router = nn.Linear(hidden, len(layers), dtype=head.weight.dtype, device=head.weight.device)
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
            self.gate = nn.Parameter(
                torch.tensor([0.0 if init == "exact" else 1.0], dtype=head.weight.dtype, device=head.weight.device)
            )
            self.last = None  # (exits [B, T, k, V], weights [B, T, k], model logits [B, T, V]) of the last forward

    module = MoDHead()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def attach(model, head) -> list:
    """Wire ``head`` into ``model`` with forward hooks: its forward returns the mixed logits. Returns the hook
    handles (``detach`` removes them)."""
    import torch

    base, stack, norm, lm_head = _parts(model)
    captured: dict[int, object] = {}
    handles = []
    for j, index in enumerate(head.layers):

        def keep(module, args, output, j=j):  # noqa: ARG001 - the hook signature
            captured[j] = output[0] if isinstance(output, tuple) else output

        handles.append(stack[index].register_forward_hook(keep))

    def mix(module, args, kwargs, output):  # noqa: ARG001
        z = output.logits
        t = z.shape[1]  # generate() asks for the last positions' logits only
        states = [captured[j][:, -t:] for j in range(len(head.layers))]
        normed = torch.stack([head.norms[j](h) for j, h in enumerate(states)], dim=-2)  # [B, T, k, hidden]
        exits = lm_head(normed)  # one projection of all k exits: [B, T, k, V], no copy of the logits
        weights = torch.softmax(head.router(norm(states[-1])), dim=-1)
        ensemble = torch.einsum("btk,btkv->btv", weights, exits)  # a batched matmul: no [B, T, k, V] product
        head.last = (exits, weights, z)
        output.logits = z + head.gate * (ensemble - z)
        captured.clear()
        return output

    handles.append(base.register_forward_hook(mix, with_kwargs=True))
    base.tli_mod_head = head  # a submodule: the optimizer and the Trainer's checkpoints see its parameters
    return handles


def detach(model, handles: list):
    """Remove the hooks and the submodule; returns the head (the model computes its own logits again)."""
    base = _parts(model)[0]
    for handle in handles:
        handle.remove()
    head = base.tli_mod_head
    del base.tli_mod_head
    return head


def mod_loss(head, logits, labels, distill_weight: float, training: bool = True):
    """Cross-entropy of the mixed ``logits`` (next token) plus, in training, the distillation term."""
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    target = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target, ignore_index=-100)
    if not training or distill_weight == 0 or head.last is None:
        return ce
    exits, _, z = head.last
    keep = target != -100
    everything = bool(keep.all())  # packed blocks: no label is masked, and indexing would copy every row

    def rows(logits):
        out = F.log_softmax(logits.float(), dim=-1).reshape(-1, vocab)
        return out if everything else out[keep]

    teacher = rows(z[:, :-1].detach())
    kls = []
    for j in range(exits.shape[-2] - 1):  # the earlier exits; the last layer's own exit is the ensemble's base
        kls.append(F.kl_div(rows(exits[:, :-1, j]), teacher, log_target=True, reduction="batchmean"))
    return ce + distill_weight * sum(kls) / len(kls)


def save_head(head, folder: Path, distill_weight: float) -> Path:
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in head.state_dict().items()}
    path = Path(folder) / HEAD_FILE
    save_file(
        tensors,
        str(path),
        metadata={
            "format": FORMAT,
            "version": VERSION,
            "layers": json.dumps(head.layers),
            "distill_weight": repr(float(distill_weight)),
        },
    )
    return path


def read_head(folder: Path, model):
    """The head saved in ``folder`` for ``model``, checked like a checkpoint header (a hostile file gets
    one line, never a traceback, and nothing from it is echoed unbounded): a regular file, the
    format's metadata within bounds, exactly the tensors a head over its layers has, finite values."""
    from safetensors import SafetensorError, safe_open

    from tli_recipe.source.checkpoint import header_tensors, read_header

    path = Path(folder) / HEAD_FILE
    expected_what = "expected the MoD head written by tli-recipe train"
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise TliError(f"{path}: cannot read ({exc.strerror}); {expected_what}") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise TliError(f"{path}: {kind}; {expected_what} (a regular file), or remove it to use the model alone")
    infos, meta = header_tensors(path, *read_header(path))  # bounded header, tensors inside the file
    if any(len(v) > MAX_META_CHARS for v in meta.values()):
        raise TliError(f"{path}: a metadata value longer than {MAX_META_CHARS:,} characters; {expected_what}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TliError(f"{path}: not a tli-recipe MoD head (format {FORMAT}, version {VERSION})")
    try:
        layers = json.loads(meta.get("layers", ""))
    except ValueError:
        layers = None
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TliError(f"{path}: its metadata 'layers' is not a list of layer indices")
    count = len(_parts(model)[1])
    if len(layers) > count:
        raise TliError(
            f"{path}: its metadata 'layers' lists {len(layers):,} layers and the model has {count}; {expected_what}"
        )
    head = new_head(model, layers)
    expected = head.state_dict()
    if set(infos) != set(expected) or any(tuple(infos[k].shape) != tuple(v.shape) for k, v in expected.items()):
        raise TliError(
            f"{path}: its tensors do not match a head over layers {layers} of this model "
            f"(expected {sorted(expected)} with the model's widths)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TliError(f"{path}: not a readable safetensors file ({type(exc).__name__}); {expected_what}") from None
    for name, tensor in tensors.items():
        values = tensor.to(expected[name].dtype)
        if not bool(values.isfinite().all()):
            raise TliError(
                f"{path}: tensor '{name}' holds NaN or infinite values (as {str(expected[name].dtype)[6:]}, the "
                f"model's dtype); a head with them scores nan; {expected_what}"
            )
    gate = float(tensors["gate"].float()[0])
    if not math.isfinite(gate) or abs(gate) > MAX_GATE:
        raise TliError(
            f"{path}: the gate is {gate:.3g}, outside +-{MAX_GATE:g} (training starts it at 0 or 1 and keeps it "
            f"near); {expected_what}"
        )
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return head


def load(folder: str | Path, *, dtype: str = "float32", device: str = "cpu", head: bool = True):
    """A model folder written by a MoD stage, as a transformers model whose forward (and ``generate``)
    returns the ensemble's mixed logits. Loads with ``trust_remote_code=False``."""
    from tli_recipe.training.loading import load_model, torch_dtype_named

    folder = Path(folder)
    if head and not has_mod_head(folder):
        raise TliError(f"{folder}: no {HEAD_FILE}; expected the output of a stage with objective: mod")
    model = load_model(folder, dtype=torch_dtype_named(dtype)).to(device).eval()
    module = read_head(folder, model).to(device=device, dtype=model.get_output_embeddings().weight.dtype).eval()
    attach(model, module)
    return model


def head_of(model):
    return _parts(model)[0].tli_mod_head


def mod_trainer(settings, resume: Optional[str] = None):
    """A Trainer class that trains with the MoD loss, gives the head its own learning rate, and keeps the
    head in every checkpoint (a LoRA checkpoint holds the adapters only)."""
    from transformers import Trainer, TrainerCallback

    class SaveHead(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):  # noqa: ARG002
            if state.is_world_process_zero and model is not None:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    save_head(head_of(model), folder, settings.distill_weight)

    class MoDTrainer(Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(SaveHead())
            if resume and has_mod_head(resume):  # the head as the interrupted run left it
                saved = read_head(Path(resume), self.model)
                head_of(self.model).load_state_dict(saved.state_dict())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ARG002
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            head = head_of(model)
            loss = mod_loss(head, outputs.logits, inputs["labels"], settings.distill_weight, model.training)
            head.last = None
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                head_ids = {id(p) for p in head_of(opt_model).parameters()}
                rest = [p for p in opt_model.parameters() if p.requires_grad and id(p) not in head_ids]
                groups = [
                    {"params": rest, "weight_decay": self.args.weight_decay},
                    {
                        "params": list(head_of(opt_model).parameters()),
                        "weight_decay": 0.0,
                        "lr": settings.learning_rate,
                    },
                ]
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
            return self.optimizer

    return MoDTrainer
