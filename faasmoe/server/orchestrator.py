"""The orchestrator modes: which engine (trunk + scheduler) serves a tenant.

shared:  one engine for every tenant; each decode step batches all tenants' tokens, so a layer's
         functions are invoked once per step for everyone.
private: one engine per tenant, each with its own trunk and KV caches, all invoking the same
         functions through the same gateway (the FaaSMoE design's private orchestrators).
"""

from __future__ import annotations

from collections.abc import Callable

from faasmoe.model.split_model import SplitModel
from faasmoe.server.engine import Engine
from faasmoe.server.scheduler import SchedulerSettings
from faasmoe.server.settings import Mode

SHARED_ENGINE = "shared"

ModelLoader = Callable[[], SplitModel]


class Orchestrator:
    def __init__(self, engines: dict[str, Engine], mode: Mode) -> None:
        self.engines = engines
        self.mode = mode

    @classmethod
    def start(
        cls, mode: Mode, tenants: list[str], load_model: ModelLoader, scheduler: SchedulerSettings
    ) -> Orchestrator:
        names = [SHARED_ENGINE] if mode is Mode.SHARED else tenants
        engines: dict[str, Engine] = {}
        try:
            for name in names:
                engines[name] = Engine(load_model(), scheduler, name=name)
        except BaseException:
            for engine in engines.values():
                engine.model.close()
            raise
        for engine in engines.values():
            engine.start()
        return cls(engines, mode)

    def engine_for(self, tenant: str) -> Engine:
        return self.engines[SHARED_ENGINE if self.mode is Mode.SHARED else tenant]

    @property
    def model(self) -> SplitModel:
        """Any engine's model: they all load the same checkpoint (for the tokenizer and config)."""
        return next(iter(self.engines.values())).model

    def active_sequences(self) -> dict[str, int]:
        return {name: engine.active_sequences for name, engine in self.engines.items()}

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
            engine.model.close()
