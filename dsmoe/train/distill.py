"""Beyond the paper: distillation from the dense base model (`train.distill`).

The loss gains weight·T²·KL(teacher ‖ student) of the next-token distributions at temperature T,
averaged over the predicted tokens (Hinton et al.'s T² keeps the gradient's scale across T). The
teacher is frozen, in eval mode, run without gradients: by default the init's own weights copied
before training, with every expert on at coefficient 1 when the init is a DSMoE model (its dense
parent exactly: `dsmoe.convert.all_experts_on`); `train.distill.teacher` names another model directory.
"""

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import dsmoe_layers


def distill_loss(student_logits, teacher_logits, temperature, mask=None):
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), the mean over tokens (those where `mask` is true)."""
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * temperature**2


@dataclass
class Distill:
    """The frozen teacher and the term's weight and temperature."""

    teacher: torch.nn.Module
    weight: float
    temperature: float

    @torch.no_grad()
    def teacher_logits(self, input_ids, attention_mask=None):
        with self.dense_teacher():
            return self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def dense_teacher(self):
        if not dsmoe_layers(self.teacher):
            return contextlib.nullcontext()
        from ..convert import all_experts_on

        return all_experts_on(self.teacher)

    def term(self, student_logits, inputs):
        """The unweighted distillation term of one micro-batch: positions whose next token is predicted."""
        teacher = self.teacher_logits(inputs["input_ids"], inputs.get("attention_mask"))
        predicted = inputs["labels"][:, 1:] != -100
        return distill_loss(student_logits[:, :-1], teacher[:, :-1], self.temperature, predicted)


def make_distill(settings, model, accelerator):
    """The run's `Distill`, or None when `train.distill.weight` is 0. Call before `accelerator.prepare`."""
    if not settings["weight"] > 0:
        return None
    if accelerator.num_processes > 1:
        raise ValueError("train.distill runs on one process only (the teacher is not sharded); "
                         f"this run has {accelerator.num_processes}")
    if settings["teacher"]:
        from ..hub import load_model

        teacher, _ = load_model(settings["teacher"], dtype=torch.float32, tokenizer=False)
    else:
        teacher = copy.deepcopy(model)
    vocab, student_vocab = teacher.get_output_embeddings().out_features, model.get_output_embeddings().out_features
    if vocab != student_vocab:
        raise ValueError(f"distillation teacher {settings['teacher']} has {vocab} output tokens, the student {student_vocab}")
    teacher.eval().requires_grad_(False).to(accelerator.device)
    return Distill(teacher, float(settings["weight"]), float(settings["temperature"]))
