"""The OpenFaaS gateway's JSON documents, with the exact field names of faas-provider's types.

Both the client and the embedded gateway use these models, so the two cannot drift apart.
Python attributes are snake_case; the wire names are the aliases. Like the Go structs
(``json:",omitempty"``), serialization leaves out empty optional fields: the real gateway
omits ``replicas``, ``availableReplicas`` and ``invocationCount`` when they are 0, and
parsing reads a missing field as its zero value.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

# Labels and annotations the gateway understands (OpenFaaS Pro / Edge spellings).
LABEL_SCALE_MIN = "com.openfaas.scale.min"
LABEL_SCALE_MAX = "com.openfaas.scale.max"
DEFAULT_SCALE_MAX = 20  # what OpenFaaS lets a function without com.openfaas.scale.max grow to
LABEL_SCALE_ZERO = "com.openfaas.scale.zero"
LABEL_SCALE_ZERO_DURATION = "com.openfaas.scale.zero-duration"
ANNOTATION_READY_PATH = "com.openfaas.ready.http.path"
# The embedded gateway's answer to an invocation names the replica that served it, which a caller may
# call directly while it is warm (as OpenFaaS's direct_functions skips the gateway's queue); not OpenFaaS's.
DIRECT_URL_HEADER = "X-Faasmoe-Direct-Url"


def _is_empty(value: Any) -> bool:
    return value is None or value == 0 or value == "" or value == {} or value == [] or value is False


class WireModel(BaseModel):
    """Base for OpenFaaS documents: aliases on the wire, Go-style omitempty on output."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    # Python names of the fields that are left out of the JSON when empty/zero.
    omit_empty: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_empty_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_empty:
            if _is_empty(getattr(self, name)):
                field = type(self).model_fields[name]
                data.pop(field.alias or name, None)
                data.pop(name, None)
        return data

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict with OpenFaaS field names."""
        return self.model_dump(mode="json", by_alias=True)

    # Go clients send `null` for nil maps and slices: read them as empty collections.
    @field_validator("env_vars", "labels", "annotations", mode="before", check_fields=False)
    @classmethod
    def _null_map_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("constraints", "secrets", mode="before", check_fields=False)
    @classmethod
    def _null_list_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class FunctionResources(WireModel):
    """``limits`` / ``requests``: e.g. memory "128M", cpu "0.5"."""

    omit_empty: ClassVar[frozenset[str]] = frozenset({"memory", "cpu"})

    memory: str | None = None
    cpu: str | None = None


class FunctionDeployment(WireModel):
    """Body of ``POST``/``PUT /system/functions``."""

    omit_empty: ClassVar[frozenset[str]] = frozenset(
        {
            "namespace",
            "env_process",
            "env_vars",
            "constraints",
            "secrets",
            "labels",
            "annotations",
            "limits",
            "requests",
            "read_only_root_filesystem",
        }
    )

    service: str
    image: str
    namespace: str | None = None
    env_process: str | None = Field(default=None, alias="envProcess")
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars")
    constraints: list[str] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    limits: FunctionResources | None = None
    requests: FunctionResources | None = None
    read_only_root_filesystem: bool = Field(default=False, alias="readOnlyRootFilesystem")


class FunctionUsage(WireModel):
    cpu: float | None = None
    total_memory_bytes: float | None = Field(default=None, alias="totalMemoryBytes")


class FunctionStatus(FunctionDeployment):
    """One entry of ``GET /system/functions``; the body of ``GET /system/function/{name}``.

    The deployment as the gateway holds it, and its counts. faas-provider names the function ``name``
    here where the deployment says ``service``: the same field under its status wire name.
    """

    omit_empty: ClassVar[frozenset[str]] = FunctionDeployment.omit_empty | {
        "invocation_count",
        "replicas",
        "available_replicas",
        "created_at",
        "usage",
    }

    service: str = Field(alias="name")
    invocation_count: int = Field(default=0, alias="invocationCount")
    replicas: int = 0
    available_replicas: int = Field(default=0, alias="availableReplicas")
    created_at: datetime | None = Field(default=None, alias="createdAt")
    usage: FunctionUsage | None = None

    @property
    def name(self) -> str:
        return self.service

    @field_validator("invocation_count", mode="before")
    @classmethod
    def _count_from_float(cls, value: Any) -> Any:
        # The Go type is float64 (read from Prometheus counters); a count is whole.
        return round(value) if isinstance(value, float) else value


class ScaleServiceRequest(WireModel):
    """Body of ``POST /system/scale-function/{name}``."""

    omit_empty: ClassVar[frozenset[str]] = frozenset({"namespace"})

    service_name: str = Field(alias="serviceName")
    replicas: int = Field(ge=0)
    namespace: str | None = None


class DeleteFunctionRequest(WireModel):
    """Body of ``DELETE /system/functions``."""

    function_name: str = Field(alias="functionName")


class VersionInfo(WireModel):
    omit_empty: ClassVar[frozenset[str]] = frozenset({"commit_message"})

    commit_message: str | None = None
    sha: str = ""
    release: str = ""


class ProviderInfo(WireModel):
    """Body of ``GET /system/info`` from a provider (the OpenFaaS gateway wraps it, with its own version)."""

    provider: str
    orchestration: str
    version: VersionInfo = Field(default_factory=VersionInfo)
