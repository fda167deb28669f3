"""The function wire format: safetensors bodies, never JSON floats or pickle.

Request tensors: hidden [T, H], layer_ids [T], expert_ids [T, K], weights [T, K] (see compute.py).
Response tensor: output [T, H] float32 partial sums.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from faasmoe.errors import BadRequest
from faasmoe.experts.compute import ExpertBatch

CONTENT_TYPE = "application/octet-stream"
REQUEST_FIELDS = ("hidden", "layer_ids", "expert_ids", "weights")
OUTPUT = "output"


def encode_batch(batch: ExpertBatch) -> bytes:
    return save({name: getattr(batch, name).contiguous() for name in REQUEST_FIELDS})


def decode_batch(body: bytes) -> ExpertBatch:
    tensors = _load(body)
    missing = [name for name in REQUEST_FIELDS if name not in tensors]
    if missing:
        raise BadRequest(f"request body lacks tensor(s) {missing}; expected {list(REQUEST_FIELDS)}")
    return ExpertBatch(**{name: tensors[name] for name in REQUEST_FIELDS})


def encode_output(output: torch.Tensor) -> bytes:
    return save({OUTPUT: output.contiguous()})


def decode_output(body: bytes) -> torch.Tensor:
    tensors = _load(body)
    if OUTPUT not in tensors:
        raise BadRequest(f"response body lacks tensor {OUTPUT!r}")
    return tensors[OUTPUT]


def _load(body: bytes) -> dict[str, torch.Tensor]:
    if not body:
        raise BadRequest("empty body; expected a safetensors payload")
    try:
        return load(body)
    except Exception as exc:  # safetensors reports header and size errors with its own types
        raise BadRequest(f"body is not a valid safetensors payload: {exc}") from exc
