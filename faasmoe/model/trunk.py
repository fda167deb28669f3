"""The trunk: the family's transformers model with every routed-expert block split out to an ExpertExecutor.

The trunk holds embeddings, attention (each sequence with its own KV cache), norms, routers, shared
experts and the LM head. It is built on the meta device and filled with the checkpoint's non-expert
tensors only, so routed-expert weights never enter this process. Each sequence gets one mask per kind of
attention layer the model has (full, or sliding-window: every other layer of gpt_oss), made as the
family's model makes it, by transformers' own mask functions over that sequence's cache.

Shape legend: N new tokens of all sequences in a step, H hidden, V vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from faasmoe.errors import CheckpointError
from faasmoe.model.attention import SequenceSlice, batched_attention
from faasmoe.model.checkpoint import Checkpoint
from faasmoe.model.families import MoeFamily
from faasmoe.model.moe_block import ExpertExecutor, LookaheadHook, PendingMoe, RoutingObserver, SplitMoeBlock
from faasmoe.planning.digest import verify_sha256

# The masks of each kind of attention layer (transformers' layer_types), as the families' models make them.
MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass
class SequenceState:
    """One sequence's KV cache and the tokens it feeds into the next step."""

    cache: DynamicCache
    new_tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class Trunk:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config
        self.layer_kinds = attention_kinds(self.config)
        # 2: dual-batch overlap (Trunk.step). 1 keeps transformers' row batching, so bf16 stays bit-identical.
        self.micro_batches = 1

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
        family = checkpoint.family
        causal_lm = family.causal_lm_class()
        # What transformers loads it with: sdpa where the family supports it, else eager (gpt_oss, for its sinks).
        config._attn_implementation = "sdpa" if causal_lm._supports_sdpa else "eager"
        with torch.device("meta"):
            model = causal_lm(config)
        sparse_block = family.sparse_block_class()
        for index, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, sparse_block):
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
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
        model.eval()
        return cls(model)

    @property
    def moe_blocks(self) -> list[SplitMoeBlock]:
        """The MoE layers' blocks, in layer order."""
        return [layer.mlp for layer in self.model.model.layers if isinstance(layer.mlp, SplitMoeBlock)]

    def observe_routing(self, observer: RoutingObserver | None) -> None:
        """Hands every MoE layer's router choices of each step to ``observer`` (None: to nobody)."""
        for block in self.moe_blocks:
            block.observer = observer

    def look_ahead(self, hook: LookaheadHook | None) -> None:
        """Hands every MoE layer's router input and choices of each step to ``hook`` (None: to nobody)."""
        for block in self.moe_blocks:
            block.lookahead = hook

    def new_sequence(self, prompt: list[int]) -> SequenceState:
        return SequenceState(cache=DynamicCache(config=self.config), new_tokens=list(prompt))

    @torch.inference_mode()
    def step(self, sequences: list[SequenceState], all_logits: bool = False) -> list[torch.Tensor]:
        """Runs every sequence's new tokens through the model in one batch of MoE calls per layer and
        micro-batch (``micro_batches``).

        Returns per sequence the logits [V] of its last new token, or [n_i, V] of all of them.
        Attention attends per sequence over its own cache; everything else runs on a micro-batch's tokens at
        once. With two micro-batches, one's routed experts are in flight while the other's attention and
        shared expert compute (dual-batch overlap); each micro-batch then makes its own calls.
        """
        inner = self.model.model
        lengths = [len(s.new_tokens) for s in sequences]
        if any(n == 0 for n in lengths):
            raise ValueError("every sequence in a step needs at least one new token")
        ids = torch.tensor([t for s in sequences for t in s.new_tokens], dtype=torch.long)
        hidden = inner.embed_tokens(ids)  # [N, H]
        micro, start = [], 0
        for run in _runs(lengths, self.micro_batches):
            tokens = sum(lengths[run.start : run.stop])
            micro.append(self._micro_batch([sequences[i] for i in run], hidden[start : start + tokens]))
            start += tokens
        for layer, kind in zip(inner.layers, self.layer_kinds, strict=True):
            for batch in micro:  # finishing its previous layer first: the other's experts are still in flight
                batch.finish_mlp()
                batch.hidden = batch.hidden + batched_attention(
                    layer.self_attn, layer.input_layernorm(batch.hidden), batch.attention[kind]
                )
                batch.start_mlp(layer)
        for batch in micro:
            batch.finish_mlp()
        hidden = inner.norm(torch.cat([batch.hidden for batch in micro]))  # [N, H]
        for seq in sequences:
            seq.new_tokens = []
        spans = _spans(lengths)
        if all_logits:
            return [self.model.lm_head(hidden[span]) for span in spans]
        last = torch.tensor([span.stop - 1 for span in spans])
        return list(self.model.lm_head(hidden[last]))  # B x [V]

    def _micro_batch(self, sequences: list[SequenceState], hidden: torch.Tensor) -> MicroBatch:
        """Consecutive sequences of the step as one micro-batch; ``hidden`` [N_m, H] holds their new tokens."""
        spans = _spans([len(s.new_tokens) for s in sequences])
        return MicroBatch(hidden, [self._slices(seq, span, hidden) for seq, span in zip(sequences, spans, strict=True)])

    def _slices(self, seq: SequenceState, span: slice, hidden: torch.Tensor) -> dict[str, SequenceSlice]:
        """The sequence's attention inputs for each kind of layer the model has, before its cache grows;
        ``span`` is its rows of ``hidden``."""
        embeds = hidden[None, span]  # [1, n, H]
        positions = torch.arange(seq.length, seq.length + embeds.shape[1])[None]  # [1, n]
        cos_sin = self.model.model.rotary_emb(embeds, positions)
        slices = {}
        for kind in dict.fromkeys(self.layer_kinds):
            mask = MASKS[kind](
                config=self.config, inputs_embeds=embeds, attention_mask=None, cache=seq.cache, position_ids=positions
            )
            slices[kind] = SequenceSlice(span, seq.cache, cos_sin, mask, position_ids=positions)
        return slices


class MicroBatch:
    """Some of a step's sequences, through the layers together: their hidden states [N_m, H], their attention
    inputs (one dict of kinds per sequence, spans in these rows) and the MLP started and not yet added."""

    def __init__(self, hidden: torch.Tensor, slices: list[dict[str, SequenceSlice]]) -> None:
        self.hidden = hidden
        self.attention = {kind: [s[kind] for s in slices] for kind in slices[0]}
        self.pending: PendingMoe | torch.Tensor | None = None

    def start_mlp(self, layer: torch.nn.Module) -> None:
        x = layer.post_attention_layernorm(self.hidden)[None]  # [1, N_m, H]
        self.pending = layer.mlp(x)  # a SplitMoeBlock's experts are in flight, a dense MLP's output is here

    def finish_mlp(self) -> None:
        if self.pending is None:
            return
        out = self.pending.finish() if isinstance(self.pending, PendingMoe) else self.pending
        self.hidden = self.hidden + out[0]
        self.pending = None


def _spans(lengths: list[int]) -> list[slice]:
    """Each sequence's rows of the step's tokens, in order."""
    spans, start = [], 0
    for n in lengths:
        spans.append(slice(start, start + n))
        start += n
    return spans


def _runs(lengths: list[int], count: int) -> list[range]:
    """Up to ``count`` runs of consecutive whole sequences with about equal tokens: each run's sequence indices."""
    total, bounds, rows = sum(lengths), [0], 0
    for index, n in enumerate(lengths[:-1]):
        rows += n
        if len(bounds) < count and rows >= total * len(bounds) / count:
            bounds.append(index + 1)  # the next run starts at this sequence
    bounds.append(len(lengths))
    return [range(first, end) for first, end in itertools.pairwise(bounds)]


def attention_kinds(config: PretrainedConfig) -> list[str]:
    """Each layer's kind of attention, as the family's model masks it and DynamicCache keeps it: the config's
    layer_types where it has them (gpt_oss alternates sliding and full, from layer 0), else every layer sliding
    when sliding_window is set (mixtral, qwen3_moe) and full otherwise."""
    sliding = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    kinds = getattr(config, "layer_types", None) or [sliding] * config.num_hidden_layers
    unknown = sorted(set(kinds) - set(MASKS))
    if unknown:
        raise CheckpointError(f"attention of type {unknown[0]!r} is not supported; supported: {', '.join(MASKS)}")
    return kinds


def _read_trunk(checkpoint: Checkpoint, trunk_file: Path | None, sha256: str | None) -> dict[str, torch.Tensor]:
    """The trunk tensors by the names of transformers' model (the files hold them by their hub keys)."""
    if trunk_file is None:
        return _model_keys(checkpoint.family, checkpoint.read(checkpoint.trunk_keys()))
    if not trunk_file.is_file():
        raise CheckpointError(f"trunk weights {trunk_file} are missing")
    if sha256 is not None:
        verify_sha256(trunk_file, sha256, "trunk file")
    family = checkpoint.family
    with safe_open(str(trunk_file), framework="pt") as f:
        hub = {key: f.get_tensor(key) for key in f.keys() if not family.is_routed_expert_key(key)}
    return _model_keys(family, hub)


def _model_keys(family: MoeFamily, hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {family.model_key(key): tensor for key, tensor in hub.items()}
