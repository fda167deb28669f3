"""A servable split model: checkpoint + plan + trunk wired to an executor, with its tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from faasmoe.model.checkpoint import Checkpoint
from faasmoe.model.moe_block import ExpertExecutor
from faasmoe.model.trunk import Trunk
from faasmoe.planning.plan import Plan

# Opens the executor of a checked plan (and its directory): faasmoe.dispatch.executor.open_executor.
OpenExecutor = Callable[[Plan, Path], ExpertExecutor]


@dataclass
class SplitModel:
    checkpoint: Checkpoint
    plan: Plan
    plan_dir: Path
    trunk: Trunk
    tokenizer: PreTrainedTokenizerBase
    executor: ExpertExecutor

    @classmethod
    def load(cls, model_dir: Path, plan_dir: Path, open_executor: OpenExecutor) -> SplitModel:
        """Opens the executor once the plan matches the checkpoint; through functions, bind a gateway first:
        ``SplitModel.load(model_dir, plan_dir, partial(open_executor, gateway=settings))``.
        """
        checkpoint = Checkpoint.open(model_dir)
        plan = Plan.load(plan_dir)
        plan.check_matches(checkpoint)
        executor = open_executor(plan, plan_dir)
        try:  # a corrupt or missing trunk must not leave the executor's connections open
            trunk = Trunk.load(checkpoint, executor, plan_dir / plan.trunk, plan.trunk_sha256)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except BaseException:
            executor.close()
            raise
        return cls(checkpoint, plan, plan_dir, trunk, tokenizer, executor)

    def close(self) -> None:
        self.executor.close()

    @property
    def vocab_size(self) -> int:
        return self.checkpoint.config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))
