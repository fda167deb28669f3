"""Unmodified transformers as the reference: the model faasmoe must match."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load_reference(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@torch.inference_mode()
def reference_logits(model: PreTrainedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [n_i, V] of every prompt position, the prompts left-padded into one batch."""
    input_ids, mask = _left_pad(prompts)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    width = input_ids.shape[1]
    return [logits[i, width - len(p) :] for i, p in enumerate(prompts)]


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    input_ids, mask = _left_pad(prompts)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, input_ids.shape[1] :].tolist()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return input_ids, mask
