"""A function's scaling and readiness policy, read from its OpenFaaS labels and annotations."""

from __future__ import annotations

import re
from dataclasses import dataclass

from faasmoe.errors import BadRequest
from faasmoe.gateway.durations import DurationError, parse_duration
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings
from faasmoe.gateway.schemas import (
    ANNOTATION_READY_PATH,
    LABEL_SCALE_MAX,
    LABEL_SCALE_MIN,
    LABEL_SCALE_ZERO,
    LABEL_SCALE_ZERO_DURATION,
    FunctionDeployment,
)

# An absolute path with an optional query, of RFC 3986's characters: probed on the replica's own address.
_READY_PATH = re.compile(r"/?[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


@dataclass(frozen=True)
class ScalePolicy:
    min_replicas: int
    max_replicas: int
    scale_to_zero: bool
    idle_timeout_s: float
    ready_path: str

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    @classmethod
    def for_deployment(cls, deployment: FunctionDeployment, settings: EmbeddedGatewaySettings) -> ScalePolicy:
        """The policy of ``deployment``; a malformed label is a BadRequest naming it."""
        labels = deployment.labels
        min_replicas = _int_label(labels, LABEL_SCALE_MIN, settings.default_min_replicas)
        max_replicas = _int_label(labels, LABEL_SCALE_MAX, settings.default_max_replicas)
        if max_replicas < 1 or min_replicas > max_replicas:
            raise BadRequest(
                f"function {deployment.service!r}: need 0 <= {LABEL_SCALE_MIN} <= {LABEL_SCALE_MAX} "
                f"and {LABEL_SCALE_MAX} >= 1, got min={min_replicas} max={max_replicas}"
            )
        ready_path = deployment.annotations.get(ANNOTATION_READY_PATH, settings.ready_path)
        if not _READY_PATH.fullmatch(ready_path):
            raise BadRequest(f"annotation {ANNOTATION_READY_PATH}={ready_path!r} is not a URL path")
        return cls(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            scale_to_zero=_bool_label(labels, LABEL_SCALE_ZERO, settings.scale_to_zero_default),
            idle_timeout_s=_duration_label(labels, LABEL_SCALE_ZERO_DURATION, settings.idle_timeout_s),
            ready_path=ready_path if ready_path.startswith("/") else "/" + ready_path,
        )


def _int_label(labels: dict[str, str], key: str, default: int) -> int:
    if key not in labels:
        return default
    try:
        value = int(labels[key])
    except ValueError:
        raise BadRequest(f"label {key}={labels[key]!r} is not a whole number") from None
    if value < 0:
        raise BadRequest(f"label {key}={labels[key]!r} must not be negative")
    return value


def _bool_label(labels: dict[str, str], key: str, default: bool) -> bool:
    if key not in labels:
        return default
    value = labels[key].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f'label {key}={labels[key]!r} must be "true" or "false"')


def _duration_label(labels: dict[str, str], key: str, default_s: float) -> float:
    if key not in labels:
        return default_s
    try:
        seconds = parse_duration(labels[key])
    except DurationError as exc:
        raise BadRequest(f"label {key}: {exc}") from None
    if seconds <= 0:
        raise BadRequest(f"label {key}={labels[key]!r} must be a positive duration")
    return seconds
