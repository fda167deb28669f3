"""Continuous batching across tenants: who runs in the next step.

Every running sequence advances one token per step (new ones prefill their prompt in the same step),
so each MoE layer fans out to the functions once per step for all tenants together. Admission is
round-robin over tenants with waiting requests, so a tenant with many requests cannot starve one with few.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from pydantic import BaseModel, Field

from faasmoe.server.sequence import Sequence


class SchedulerSettings(BaseModel):
    max_running: int = Field(64, ge=1, description="sequences decoding together in one step")
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens admitted in one step")


class Scheduler:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # per tenant, in round-robin order
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.setdefault(seq.tenant, deque()).append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """Returns (sequences to step, cancelled sequences dropped since the last step)."""
        dropped = [s for s in self.running if s.cancelled]
        self.running = [s for s in self.running if not s.cancelled]
        for queue in self.waiting.values():
            dropped += [s for s in queue if s.cancelled]
            kept = [s for s in queue if not s.cancelled]
            queue.clear()
            queue.extend(kept)
        self._admit()
        return list(self.running), dropped

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)

    def _admit(self) -> None:
        budget = self.settings.max_prefill_tokens
        admitted_any = True
        while admitted_any and len(self.running) < self.settings.max_running:
            admitted_any = False
            for tenant in list(self.waiting):
                queue = self.waiting[tenant]
                if not queue or len(self.running) >= self.settings.max_running:
                    continue
                prompt = len(queue[0].state.new_tokens)
                # One oversize prompt still runs alone rather than waiting forever.
                if prompt > budget and budget < self.settings.max_prefill_tokens:
                    continue
                self.running.append(queue.popleft())
                budget -= prompt
                admitted_any = True
                self.waiting.move_to_end(tenant)  # the next admission starts with the next tenant
                break
