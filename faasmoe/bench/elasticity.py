"""The elasticity figures of a system whose functions scale to zero: cold against warm TTFT, prewarm hits and
waste, and what keeping functions warm cost. Read from the requests' timings, the process samples and the
control planes' /metrics over the measured window.

- A request is *cold* when the whole system had been idle (no request in flight) for longer than the
  keep-alive label plus one gateway reaper period before it was sent: every function was at zero. It is
  *warm* when sent after the latest cold request's first token (that prompt has woken its functions);
  requests sent in between queue behind the cold start and are neither.
- An invocation is a *miss* when it met its function at zero and so started it itself. Every replica
  started in the window was started either by a prewarm wake (`faasmoe_prewarm_calls_total{outcome=
  "scaled"}`) or by such an invocation, so misses = replica starts - wakes; the hit rate is the share of
  invocations that found their function warm or already starting. A replica that was started and never
  invoked before it stopped (replica starts - invocations that met a fresh replica) is a wasted prewarm.
  With `--prewarm predicted` the next-layer lookahead scores itself too (`faasmoe_lookahead_*_total`): the
  share of the guessed layers' (token, expert) choices it foresaw, and of their invoked functions.
- A request *met a cold function* when a function replica started while it was in flight: in shared mode
  every running request's next step waits for a function the step invokes. A replica woken by a wasted
  prewarm counts too, so with prewarming this overcounts a little.
"""

from __future__ import annotations

from dataclasses import dataclass

from faasmoe.bench.breakdown import Scrape
from faasmoe.bench.loadgen import RequestResult
from faasmoe.bench.metrics import Percentiles
from faasmoe.bench.settings import Elasticity
from faasmoe.bench.wake import WakeFigures
from faasmoe.elastic.prewarm import WakeOutcome

GB = 1e9
PREWARM_CALLS = "faasmoe_prewarm_calls"
INVOCATIONS = "faasmoe_function_invocations"
FRESH_REPLICA_INVOCATIONS = "faasmoe_function_cold_starts"  # invocations that met a replica's first call
SCALE_DOWNS = "faasmoe_keep_alive_scale_downs"
LOOKAHEAD = "faasmoe_lookahead_"  # + predicted_slots, correct_slots, invoked_functions, foreseen_functions
TARGET_COLD_PENALTY_VS_WAKE = 1.25


@dataclass(frozen=True)
class ColdFigures:
    idle_s: float  # a request is cold after the system was idle this long
    cold_requests: int
    warm_requests: int
    behind_cold: int  # sent while a cold request waited for its first token: neither cold nor warm
    cold_ttft_p99_s: float | None
    warm_ttft_p99_s: float | None
    penalty_s: float | None  # cold TTFT p99 - warm TTFT p99
    wake: WakeFigures | None  # every function woken at once through the scale API (faasmoe-shared only)
    penalty_vs_wake: float | None  # penalty / the wake's median; target <= 1.25


@dataclass(frozen=True)
class PrewarmFigures:
    invocations: int
    fresh_replica_invocations: int  # a replica's first invocation (woken by a prewarm or by itself)
    replica_starts: int  # function processes started in the window
    wakes: int  # prewarm calls that scaled a function from zero
    already_up: int  # prewarm calls that found the function with replicas
    failed_wakes: int  # not found or another gateway error
    misses: int  # invocations that met their function at zero
    hit_rate: float | None  # 1 - misses / invocations
    wasted: int  # replicas started and never invoked
    lookahead_slot_accuracy: float | None  # correct / predicted (token, expert) choices (None: no guesses)
    lookahead_foreseen: float | None  # of the guessed layers' invoked functions, the share it guessed


@dataclass(frozen=True)
class KeepAliveFigures:
    requests: int
    met_cold: int  # requests in flight while a function replica started
    function_gb_s: float  # the function replicas' PSS integral
    scale_downs: int  # functions the control plane scaled to zero, idle past their keep-alive (adaptive)


@dataclass(frozen=True)
class ElasticityFigures:
    prewarm: str | None  # the mode the system ran (None: faasmoe serve's default)
    keep_alive: str | None
    cold: ColdFigures
    prewarms: PrewarmFigures
    keep_alive_cost: KeepAliveFigures


def split_cold(results: list[RequestResult], idle_s: float) -> tuple[list[RequestResult], list[RequestResult]]:
    """The cold and the warm requests among the completed ones (see the module's docstring)."""
    cold: list[RequestResult] = []
    warm: list[RequestResult] = []
    busy_until = float("-inf")  # when the last request sent so far ended
    woken_at = float("-inf")  # the latest cold request's first token
    for result in sorted(results, key=lambda r: r.sent_t):
        if result.ok and result.sent_t - busy_until > idle_s:
            cold.append(result)
            woken_at = result.token_times[0]
        elif result.ok and result.sent_t >= woken_at:
            warm.append(result)
        busy_until = max(busy_until, result.end_t)
    return cold, warm


def cold_figures(results: list[RequestResult], idle_s: float, wake: WakeFigures | None) -> ColdFigures:
    cold, warm = split_cold(results, idle_s)
    cold_p99 = Percentiles.of([r.ttft_s for r in cold if r.ttft_s is not None]).p99
    warm_p99 = Percentiles.of([r.ttft_s for r in warm if r.ttft_s is not None]).p99
    penalty = cold_p99 - warm_p99 if cold_p99 is not None and warm_p99 is not None else None
    wake_s = wake.median_s if wake else None
    ratio = penalty / wake_s if penalty is not None and wake_s else None
    behind = sum(1 for r in results if r.ok) - len(cold) - len(warm)
    return ColdFigures(idle_s, len(cold), len(warm), behind, cold_p99, warm_p99, penalty, wake, ratio)


def prewarm_figures(window: Scrape, replica_starts: int) -> PrewarmFigures:
    """``window``: the control planes' /metrics over the window (after minus before)."""
    invocations = round(window.counter(INVOCATIONS))
    fresh = round(window.counter(FRESH_REPLICA_INVOCATIONS))
    outcomes = {o: round(window.counter(PREWARM_CALLS, outcome=o.value)) for o in WakeOutcome}
    wakes = outcomes[WakeOutcome.SCALED]
    misses = max(replica_starts - wakes, 0)
    return PrewarmFigures(
        invocations=invocations,
        fresh_replica_invocations=fresh,
        replica_starts=replica_starts,
        wakes=wakes,
        already_up=outcomes[WakeOutcome.ALREADY_UP],
        failed_wakes=outcomes[WakeOutcome.NOT_FOUND] + outcomes[WakeOutcome.FAILED],
        misses=misses,
        hit_rate=1 - min(misses, invocations) / invocations if invocations else None,
        wasted=max(replica_starts - fresh, 0),
        lookahead_slot_accuracy=_share(window, "correct_slots", "predicted_slots"),
        lookahead_foreseen=_share(window, "foreseen_functions", "invoked_functions"),
    )


def _share(window: Scrape, part: str, whole: str) -> float | None:
    total = window.counter(LOOKAHEAD + whole)
    return window.counter(LOOKAHEAD + part) / total if total > 0 else None


def met_cold(results: list[RequestResult], replica_starts: list[float], interval_s: float) -> int:
    """Requests in flight while a replica started; a start is seen at the first sample after it, so up to
    one sampling interval late."""
    return sum(1 for r in results if any(r.sent_t <= seen and seen - interval_s < r.end_t for seen in replica_starts))


def elasticity_figures(
    elasticity: Elasticity | None,
    results: list[RequestResult],
    window: Scrape,
    replica_starts: list[float],
    function_gb_s: float,
    idle_s: float,
    interval_s: float,
    wake: WakeFigures | None,
) -> ElasticityFigures:
    keep = KeepAliveFigures(
        requests=len(results),
        met_cold=met_cold(results, replica_starts, interval_s),
        function_gb_s=function_gb_s,
        scale_downs=round(window.counter(SCALE_DOWNS)),
    )
    return ElasticityFigures(
        prewarm=elasticity.prewarm.value if elasticity else None,
        keep_alive=elasticity.keep_alive.value if elasticity else None,
        cold=cold_figures(results, idle_s, wake),
        prewarms=prewarm_figures(window, len(replica_starts)),
        keep_alive_cost=keep,
    )
