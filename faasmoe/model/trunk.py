"""The trunk: transformers' Qwen2-MoE with every routed-expert block split out to an ExpertExecutor.

The trunk holds embeddings, attention (each sequence with its own KV cache), norms, routers, shared
experts and the LM head. It is built on the meta device and filled with the checkpoint's non-expert
tensors only, so routed-expert weights never enter this process.

Shape legend: N new tokens of all sequences in a step, H hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DynamicCache, Qwen2MoeForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding, Qwen2MoeSparseMoeBlock

from faasmoe.errors import CheckpointError
from faasmoe.model.attention import SequenceSlice, batched_attention
from faasmoe.model.checkpoint import Checkpoint, is_routed_expert_key
from faasmoe.model.moe_block import ExpertExecutor, SplitMoeBlock
from faasmoe.planning.digest import verify_sha256


@dataclass
class SequenceState:
    """One sequence's KV cache and the tokens it feeds into the next step."""

    cache: DynamicCache
    new_tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class Trunk:
    def __init__(self, model: Qwen2MoeForCausalLM) -> None:
        self.model = model
        self.config = model.config

    @classmethod
    def load(
        cls,
        checkpoint: Checkpoint,
        executor: ExpertExecutor,
        trunk_file: Path | None = None,
        trunk_sha256: str | None = None,
    ) -> Trunk:
        """Builds the trunk from the checkpoint (or a plan's trunk file) without reading any routed expert.

        ``trunk_sha256`` is the plan's digest of ``trunk_file``: a file that differs raises ShardError.
        """
        config = checkpoint.config
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen2MoeForCausalLM(config)
        for index, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, Qwen2MoeSparseMoeBlock):
                layer.mlp = SplitMoeBlock(layer.mlp, index, executor)
        state = _read_trunk(checkpoint, trunk_file, trunk_sha256)
        if config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise CheckpointError(f"{checkpoint.path}: trunk tensor {missing[0]} is missing")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
        # Buffers computed at construction (rotary frequencies) were made on meta: rebuild them.
        model.model.rotary_emb = Qwen2MoeRotaryEmbedding(config)
        model.eval()
        return cls(model)

    def new_sequence(self, prompt: list[int]) -> SequenceState:
        return SequenceState(cache=DynamicCache(config=self.config), new_tokens=list(prompt))

    @torch.inference_mode()
    def step(self, sequences: list[SequenceState], all_logits: bool = False) -> list[torch.Tensor]:
        """Runs every sequence's new tokens through the model in one batch of MoE calls per layer.

        Returns per sequence the logits [V] of its last new token, or [n_i, V] of all of them.
        Attention attends per sequence over its own cache; everything else runs on all N tokens at once.
        """
        inner = self.model.model
        lengths = [len(s.new_tokens) for s in sequences]
        if any(n == 0 for n in lengths):
            raise ValueError("every sequence in a step needs at least one new token")
        ids = torch.tensor([t for s in sequences for t in s.new_tokens], dtype=torch.long)
        hidden = inner.embed_tokens(ids)  # [N, H]
        slices, start = [], 0
        for seq, n in zip(sequences, lengths, strict=True):
            slices.append(self._slice(seq, slice(start, start + n), hidden))
            start += n
        for layer in inner.layers:
            hidden = hidden + batched_attention(layer.self_attn, layer.input_layernorm(hidden), slices)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden)[None])[0]
        hidden = inner.norm(hidden)  # [N, H]
        for seq in sequences:
            seq.new_tokens = []
        spans = [s.span for s in slices]
        if all_logits:
            return [self.model.lm_head(hidden[span]) for span in spans]
        last = torch.tensor([span.stop - 1 for span in spans])
        return list(self.model.lm_head(hidden[last]))  # B x [V]

    def _slice(self, seq: SequenceState, span: slice, hidden: torch.Tensor) -> SequenceSlice:
        embeds = hidden[None, span]  # [1, n, H]
        positions = torch.arange(seq.length, seq.length + embeds.shape[1])[None]  # [1, n]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=None,
            past_key_values=seq.cache,
            position_ids=positions,
        )
        cos_sin = self.model.model.rotary_emb(embeds, positions)
        return SequenceSlice(span=span, cache=seq.cache, position_embeddings=cos_sin, mask=mask, position_ids=positions)


def _read_trunk(checkpoint: Checkpoint, trunk_file: Path | None, sha256: str | None) -> dict[str, torch.Tensor]:
    if trunk_file is None:
        return checkpoint.read(checkpoint.trunk_keys())
    if not trunk_file.is_file():
        raise CheckpointError(f"trunk weights {trunk_file} are missing")
    if sha256 is not None:
        verify_sha256(trunk_file, sha256, "trunk file")
    with safe_open(str(trunk_file), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if not is_routed_expert_key(key)}
