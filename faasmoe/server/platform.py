"""Everything one control plane serves with: tenants, engines (per mode), tokenizer, metrics, gateway, reconciler.

Loaded once before the HTTP server starts, so a bad checkpoint, plan or tenants file fails the start
with a clear message instead of failing requests later.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import GatewayConnection, InvocationLog
from faasmoe.elastic.hot_replicas import ReadyReplicas, ReplicaScaler
from faasmoe.elastic.idler import Idler
from faasmoe.elastic.keep_alive import KeepAliveMode
from faasmoe.elastic.lookahead import Lookahead
from faasmoe.elastic.predictor import PopularityPredictor
from faasmoe.elastic.prewarm import Prewarmer, PrewarmMode, WakeProbabilities, every_function
from faasmoe.elastic.routing_profile import ProfileWriter, load_profile
from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.gateway.client import GatewayClient, GatewayError, GatewaySettings
from faasmoe.gateway.durations import parse_positive_duration
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.plan import Plan
from faasmoe.server.metrics import Metrics, StepBreakdown
from faasmoe.server.orchestrator import Orchestrator
from faasmoe.server.reconciler import Reconciler
from faasmoe.server.settings import ServeSettings
from faasmoe.server.tenants import TenantRegistry

log = logging.getLogger(__name__)
READY_CHECK_TTL_S = 2.0  # /ready asks the gateway at most this often


@dataclass
class Platform:
    settings: ServeSettings
    tenants: TenantRegistry
    orchestrator: Orchestrator
    metrics: Metrics
    reconciler: Reconciler
    routing: RoutingStats  # every engine's, restored from and saved to the routing profile
    # The one gateway client: every engine's invocations, /ready, metrics and the reconciler run on its loop.
    gateway: GatewayConnection | None = None
    prewarmer: Prewarmer | None = None  # None: --prewarm off, or no gateway
    profile_writer: ProfileWriter | None = None  # None: no --routing-profile
    idler: Idler | None = None  # None: --keep-alive fixed, or no gateway
    replica_scaler: ReplicaScaler | None = None  # None: --replica-queue-target-ms off, or no gateway
    created: int = field(default_factory=lambda: int(time.time()))
    _reconciling: Future[None] | None = None
    _idling: Future[None] | None = None
    _replicating: Future[None] | None = None
    _readiness: tuple[float, str | None] = (float("-inf"), None)  # (checked at, why not ready)

    @classmethod
    def load(cls, settings: ServeSettings) -> Platform:
        tenants = TenantRegistry.load(settings.tenants)
        metrics = Metrics()
        log = InvocationLog(keep=False, observers=[metrics.observe_invocation])
        gateway = _open_gateway(settings)
        # Every engine's transport splits a hot function's calls over the replicas the scaler has seen ready.
        ready = ReadyReplicas() if gateway is not None and settings.hot_replicas.enabled else None
        opener = partial(open_executor, gateway=gateway, log=log, ready_replicas=ready)

        def load_model() -> SplitModel:
            model = SplitModel.load(settings.model, settings.plan, opener)
            model.trunk.micro_batches = settings.micro_batches
            return model

        orchestrator = None
        try:
            orchestrator = Orchestrator.start(settings.mode, list(tenants.tenants), load_model, settings.scheduler)
            routing = _record_routing(settings, orchestrator)
        except BaseException:
            if orchestrator is not None:
                orchestrator.stop()
            if gateway is not None:
                gateway.close()
            raise
        metrics.count_routing(routing)
        for engine in orchestrator.engines.values():
            breakdown = StepBreakdown(metrics, engine.name, engine.model.trunk.model)
            engine.step_starting.append(breakdown.start)
            engine.step_observers.append(breakdown)
        functions = settings.functions if settings.reconcile else None
        reconciler = Reconciler(orchestrator.model.plan, functions, settings.reconcile_interval_s)
        prewarmer = _prewarmer(settings, gateway, orchestrator.model.plan, routing, metrics)
        if prewarmer is not None:
            log.observers.append(prewarmer.observe_invocation)
            if settings.prewarm is PrewarmMode.PREDICTED:
                _look_ahead(orchestrator, prewarmer, metrics)
        idler = _idler(settings, gateway, orchestrator.model.plan, metrics)
        if idler is not None:
            log.observers.append(idler.observe_invocation)
            if prewarmer is not None:  # a function the idler scaled down is no longer believed warm
                idler.scaled_down.append(prewarmer.forget_warm)
        scaler = None
        if ready is not None:
            names = [function.name for function in orchestrator.model.plan.functions]
            scaler = ReplicaScaler(names, settings.hot_replicas, ready, metrics)
            log.observers.append(scaler.observe_invocation)
            if idler is not None:  # a function the idler scaled to zero has no replicas left to own or split over
                idler.scaled_down.append(scaler.forget)
        writer = None
        if settings.routing_profile is not None:
            writer = ProfileWriter(settings.routing_profile, routing, settings.model_name,
                                   settings.routing_profile_interval_s)  # fmt: skip
        return cls(settings, tenants, orchestrator, metrics, reconciler, routing, gateway, prewarmer, writer, idler,
                   replica_scaler=scaler)  # fmt: skip

    @property
    def model(self) -> SplitModel:
        return self.orchestrator.model

    @property
    def max_prompt_tokens(self) -> int:
        context = self.model.checkpoint.config.max_position_embeddings
        return min(self.settings.max_prompt_tokens or context, context)

    def prewarm(self, tenant: str, prompt_tokens: int) -> None:
        """Wakes the functions a just-admitted request will need; returns at once (a no-op when not prewarming)."""
        if self.prewarmer is not None:
            self.prewarmer.prewarm(tenant, prompt_tokens)

    def open(self) -> None:
        """When the server starts: the reconciler, if reconciling, the idler, if adaptive, and the replica scaler,
        if on (all on the gateway connection's loop), and the routing profile's periodic writes."""
        if self.gateway is not None and self.settings.reconcile:
            self._reconciling = self.gateway.submit(self.reconciler.run)
            self._reconciling.add_done_callback(partial(_log_if_failed, "the reconciler"))
        if self.gateway is not None and self.idler is not None:
            self._idling = self.gateway.submit(self.idler.run)
            self._idling.add_done_callback(partial(_log_if_failed, "the idler"))
        if self.gateway is not None and self.replica_scaler is not None:
            self._replicating = self.gateway.submit(self.replica_scaler.run)
            self._replicating.add_done_callback(partial(_log_if_failed, "the replica scaler"))
        if self.profile_writer is not None:
            self.profile_writer.start()

    async def not_ready(self) -> str | None:
        """Why requests cannot be served now (None when they can), checked at most every READY_CHECK_TTL_S.

        The model is loaded before the server listens; with a gateway, it must answer and run every
        function of the plan as planned.
        """
        if self.gateway is None:
            return None
        checked_at, reason = self._readiness
        if time.monotonic() - checked_at > READY_CHECK_TTL_S:
            reason = await self.gateway.run(self._gateway_problem)
            self._readiness = (time.monotonic(), reason)
        return reason

    async def _gateway_problem(self, gateway: GatewayClient) -> str | None:
        if not await gateway.healthz():
            return "the gateway is unreachable"
        try:
            return (await self.reconciler.compare(gateway)).problem
        except GatewayError as exc:  # its message names the gateway's URL: /ready is public
            return f"the gateway did not list its functions (HTTP {exc.status})"

    async def metrics_page(self) -> bytes:
        if self.gateway is not None:
            try:
                self.metrics.set_replicas(await self.gateway.run(lambda client: client.list_functions()))
            except Exception:  # metrics stay available with the gateway down; /ready reports that
                pass
        return self.metrics.render(self.orchestrator.active_sequences())

    async def close(self) -> None:
        """When the server stops: the reconciler, the idler and the replica scaler (the connection stays open until
        the engines stop)."""
        for running in (self._reconciling, self._idling, self._replicating):
            if running is not None:
                running.cancel()

    def stop(self) -> None:
        self.orchestrator.stop()
        if self.profile_writer is not None:  # after the engines: their last steps are in the profile
            self.profile_writer.stop()
        if self.gateway is not None:  # after the engines: a step in flight still needs the connection
            self.gateway.close()


def _record_routing(settings: ServeSettings, orchestrator: Orchestrator) -> RoutingStats:
    """Counts every engine's routing per tenant, from the routing profile's counts if there is one.

    The engine tells its recorder, before each step, whose tokens the step holds and how many (in the
    trunk's token order); the trunk hands it each MoE layer's router choices; after the step it counts.
    """
    shape = orchestrator.model.plan.model
    stats = RoutingStats(shape.moe_layers, shape.num_experts, settings.routing_half_life_s)
    if settings.routing_profile is not None:
        load_profile(settings.routing_profile, stats, settings.model_name)
    for engine in orchestrator.engines.values():
        recorder = stats.recorder()
        engine.model.trunk.observe_routing(recorder.observe)
        engine.step_starting.append(
            lambda batch, recorder=recorder: recorder.start_step([(s.tenant, len(s.state.new_tokens)) for s in batch])
        )
        engine.step_observers.append(lambda batch, seconds, recorder=recorder: recorder.end_step())
    return stats


def _log_if_failed(what: str, running: Future[None]) -> None:
    # It retries gateway errors itself: anything else ended it, and the server would not say so otherwise.
    if not running.cancelled() and running.exception() is not None:
        log.error("%s stopped", what, exc_info=running.exception())


def _prewarmer(
    settings: ServeSettings, gateway: GatewayConnection | None, plan: Plan, routing: RoutingStats, metrics: Metrics
) -> Prewarmer | None:
    """The one place prewarming is built from the settings, its policy (which functions, how likely) included."""
    if gateway is None or settings.prewarm is PrewarmMode.OFF:
        return None
    predict: WakeProbabilities
    if settings.prewarm is PrewarmMode.ALL:
        predict = every_function(function.name for function in plan.functions)
    else:
        predict = PopularityPredictor(plan, routing, settings.predictor).wake_probabilities
    return Prewarmer(gateway, predict, settings.prewarm_threshold, settings.prewarm_concurrency, metrics)


def _look_ahead(orchestrator: Orchestrator, prewarmer: Prewarmer, metrics: Metrics) -> None:
    """``--prewarm predicted``, during steps: each engine's trunk wakes what it guesses its next layer invokes."""
    counts = []
    for engine in orchestrator.engines.values():
        trunk = engine.model.trunk
        lookahead = Lookahead(trunk.moe_blocks, engine.model.plan, prewarmer.wake)
        trunk.look_ahead(lookahead)
        counts.append(lookahead.counts)
    metrics.count_lookahead(counts)


def _idler(settings: ServeSettings, gateway: GatewayConnection | None, plan: Plan, metrics: Metrics) -> Idler | None:
    """``--keep-alive adaptive`` with a gateway; the functions' labels, once read, bound each keep-alive."""
    if gateway is None or settings.keep_alive is KeepAliveMode.FIXED:
        return None
    fixed_s = parse_positive_duration(settings.functions.zero_duration)  # what `faasmoe deploy` labels them with
    return Idler(plan, fixed_s, settings.keep_alive_policy, metrics)


def _open_gateway(settings: ServeSettings) -> GatewayConnection | None:
    if settings.gateway is None:
        return None
    auth = settings.gateway_basic_auth.get_secret_value() if settings.gateway_basic_auth else None
    return GatewayConnection(GatewaySettings.from_url(settings.gateway, auth))
