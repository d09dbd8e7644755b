"""Knowledge distillation from the dense model during recovery (`fxprune.recovery.lora.tune(..., teacher=...)`).

The pruned GraphModule is the student and the model it was pruned from is the teacher, so the two
share the tokenizer by construction; `check_teacher` still verifies that their vocabularies agree
before any training. The teacher runs under `torch.no_grad()` in the student's dtype, so it adds
one forward pass per micro-batch and no optimizer state or activation memory for the backward.

Loss per micro-batch (see `recovery_loss`):
    (1 - kd_alpha) * CE(student, labels) + kd_alpha * T^2 * KL(teacher_T || student_T)
    + hidden_weight * MSE(student hidden, teacher hidden)
where `_T` is a softmax at temperature T over every real (non-padding) position, not only the
response tokens that CE is taken on: the teacher's distribution is informative at every position.
The hidden states are the inputs of the output head (the final normalised residual stream); they can
only be matched when the hidden channels were not pruned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxprune.recovery.targets import output_heads


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over real positions of KL(softmax(teacher/T) || softmax(student/T)), computed in fp32.

    Zero exactly when the two logits agree up to a per-position constant; the T^2 factor keeps the
    gradient scale independent of T (Hinton et al.)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student must share the tokenizer")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return temperature ** 2 * _masked_mean(per_position, attention_mask)


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between hidden states over the real positions (mean over features too)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden-state matching needs equal shapes: student {tuple(student_hidden.shape)}, "
                         f"teacher {tuple(teacher_hidden.shape)} (were hidden channels pruned?)")
    per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return _masked_mean(per_position, attention_mask)


def _masked_mean(per_position: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return per_position.mean()
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that produces the logits: `get_output_embeddings()` of a transformers model, else the
    output head found in the graph of a GraphModule (`fxprune.recovery.targets.output_heads`)."""
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings()
    if isinstance(model, torch.fx.GraphModule):
        heads = output_heads(model)
        if len(heads) == 1:
            return model.get_submodule(heads[0])
    raise ValueError(f"cannot find the output head of {type(model).__name__} (needed for its vocabulary "
                     f"size and for hidden-state matching)")


def vocab_size(model: torch.nn.Module) -> int:
    """Number of logits the model's output head produces; raises `ValueError` when the head is not a linear layer."""
    head = output_head(model)
    if not hasattr(head, "out_features"):
        raise ValueError(f"the output head of {type(model).__name__} is a {type(head).__name__}, not a linear layer")
    return int(head.out_features)


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module, match_hidden: bool) -> None:
    """Refuse a teacher whose vocabulary (or, with hidden matching, hidden size) differs from the student's,
    before any training starts."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"the teacher's output head has {vt} tokens, the student's {vs}: distillation needs the "
                         "model the student was pruned from (same tokenizer)")
    if match_hidden:
        hs, ht = output_head(student).in_features, output_head(teacher).in_features
        if hs != ht:
            raise ValueError(f"hidden_weight > 0 matches hidden states, but the student's are {hs} wide and the "
                             f"teacher's {ht} (hidden channels were pruned); set hidden_weight=0")


class HeadInput:
    """Records the input of a model's output head at each forward pass (the final hidden states)."""

    def __init__(self, model: torch.nn.Module):
        self.value = None
        self._handle = output_head(model).register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.value = args[0]

    def pop(self) -> torch.Tensor:
        """The recorded head input of the last forward pass (cleared); raises `RuntimeError` when the head did not
        run."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the output head did not run in this forward pass")
        return value

    def remove(self):
        """Remove the forward hook."""
        self._handle.remove()


def _floating_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class Teacher:
    """The frozen teacher: moved to the student's device and dtype (in place: no second copy in memory), in
    eval mode, without gradients. `close()` gives back its requires_grad flags and training mode."""

    def __init__(self, model: torch.nn.Module, student: torch.nn.Module, device, match_hidden: bool):
        check_teacher(student, model, match_hidden)
        self._flags = {p: p.requires_grad for p in model.parameters()}
        self._training = model.training
        self.model = model.to(device=device, dtype=_floating_dtype(student)).eval()
        self.model.requires_grad_(False)
        self.hidden = HeadInput(self.model) if match_hidden else None

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask):
        out = self.model(input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out["logits"]
        return logits, (self.hidden.pop() if self.hidden is not None else None)

    def close(self):
        """Give back the teacher's requires_grad flags and training mode, and remove its hook."""
        if self.hidden is not None:
            self.hidden.remove()
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        self.model.train(self._training)


def recovery_loss(student_logits, batch, ce_loss, teacher_out, kd_alpha: float, temperature: float,
                  hidden_weight: float = 0.0, student_hidden=None) -> tuple[torch.Tensor, dict]:
    """The combined loss of one micro-batch and its parts {"ce", "kd"[, "hidden"]} (detached)."""
    teacher_logits, teacher_hidden = teacher_out
    kd = kd_loss(student_logits, teacher_logits, batch["attention_mask"], temperature)
    loss = (1.0 - kd_alpha) * ce_loss + kd_alpha * kd
    parts = {"ce": ce_loss.detach(), "kd": kd.detach()}
    if hidden_weight:
        hid = hidden_loss(student_hidden, teacher_hidden, batch["attention_mask"])
        loss = loss + hidden_weight * hid
        parts["hidden"] = hid.detach()
    return loss, parts
