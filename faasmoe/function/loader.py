"""Loads the function's shard in a background thread, so the server answers /health and /ready meanwhile."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from faasmoe.function import timeline as milestones
from faasmoe.function.settings import FunctionSettings
from faasmoe.function.timeline import Timeline

if TYPE_CHECKING:
    from faasmoe.experts.compute import ExpertSet
    from faasmoe.function.invoke import Invoker
    from faasmoe.planning.digest import DigestCheck

logger = logging.getLogger(__name__)


class LoadState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WeightsLoader:
    """Imports torch, fetches and loads the shard once; tells listeners when it is done either way."""

    def __init__(self, settings: FunctionSettings, timeline: Timeline) -> None:
        self.settings = settings
        self.timeline = timeline
        self.state = LoadState.LOADING
        self.error: str | None = None
        self.invoker: Invoker | None = None
        self.digest: DigestCheck | None = None  # how the shard was checked against the plan's sha256
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        # A daemon thread: SIGTERM during a long download or import must not wait for it.
        self._thread = threading.Thread(target=self._run, name="faasmoe-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.state is not LoadState.LOADING

    def on_done(self, listener: Callable[[], None]) -> None:
        """Calls ``listener`` (from the loader thread) once loading ends, or now if it already has."""
        with self._lock:
            if not self.done:
                self._listeners.append(listener)
                return
        listener()

    def _run(self) -> None:
        try:
            invoker = self._load()
        except Exception as exc:  # any failure is reported by /ready, never raised into a dead thread
            logger.error("function %s: loading weights failed: %s", self.settings.function, exc)
            self._finish(LoadState.FAILED, error=str(exc) or repr(exc))
        else:
            logger.info(
                "function %s: %d experts (%.1f MB) ready %.3f s after process start (shard sha256: %s)",
                self.settings.function,
                len(invoker.experts.experts),
                invoker.experts.nbytes() / 1e6,
                self.timeline.get(milestones.LOADED),
                self.digest.value if self.digest else "not checked",
            )
            self._finish(LoadState.READY, invoker=invoker)

    def _load(self) -> Invoker:
        import torch

        from faasmoe.function import weights
        from faasmoe.function.invoke import Invoker

        if self.settings.threads is not None:
            # Global in torch: the compute thread picks it up when it first runs a parallel op.
            torch.set_num_threads(self.settings.threads)
        self.timeline.mark(milestones.IMPORTS)
        if self.settings.shard_sha256 is None:
            logger.warning("function %s: no FAASMOE_SHARD_SHA256: its shard loads unverified", self.settings.function)
        if not weights.is_remote(self.settings.weights_uri):
            return Invoker(self._read(weights.local_shard_path(self.settings)))
        path = weights.download_shard(self.settings)
        self.timeline.mark(milestones.DOWNLOADED)
        try:
            return Invoker(self._read(path))
        finally:
            if not self.settings.keep_download:
                path.unlink(missing_ok=True)  # a mapped file lives on, unnamed, until the replica exits

    def _read(self, path: Path) -> ExpertSet:
        from faasmoe.experts.shard import ShardFile

        with ShardFile(path) as shard:
            self.digest = shard.verify(self.settings.shard_sha256)
            self.timeline.mark(milestones.VERIFIED)
            experts = shard.experts()
        self.timeline.mark(milestones.LOADED)
        return experts

    def _finish(self, state: LoadState, invoker: Invoker | None = None, error: str | None = None) -> None:
        with self._lock:
            self.invoker, self.error = invoker, error
            self.state = state
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()
