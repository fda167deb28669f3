"""Property-based fuzzing of the function wire format: any body gets BadRequest (a 400) or a result.

Arbitrary bytes, safetensors headers built field by field (dtypes, shapes, offsets, names), flipped and
cut valid payloads, and well-formed payloads of any tensors through the function's whole invocation
path (decode, check, compute). Nothing may raise anything but BadRequest. Bounded to a few seconds.
"""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from faasmoe.errors import BadRequest
from faasmoe.experts.compute import ExpertBatch, ExpertSet, ExpertWeights
from faasmoe.experts.wire import REQUEST_FIELDS, decode_batch, decode_output, encode_batch, encode_output
from faasmoe.function.invoke import Invoker

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
HIDDEN, INTERMEDIATE, EXPERTS = 8, 4, 3


def decodes_or_refuses(body: bytes) -> None:
    """The property: each decoder returns tensors or raises BadRequest, whatever ``body`` holds."""
    for decode in (decode_batch, decode_output):
        try:
            result = decode(body)
        except BadRequest as error:
            assert str(error)  # says what is wrong
            continue
        tensors = [getattr(result, name) for name in REQUEST_FIELDS] if isinstance(result, ExpertBatch) else [result]
        assert all(isinstance(tensor, torch.Tensor) for tensor in tensors)


def safetensors_body(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2", "F4", "E8M0", "f32", "", "X"]  # fmt: skip
TENSOR_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-2, 2**64 + 2), max_size=3),
    }
)
HEADER = st.dictionaries(
    st.sampled_from([*REQUEST_FIELDS, "output", "__metadata__"]) | st.text(max_size=8),
    TENSOR_ENTRY | st.integers() | st.text(max_size=8) | st.none() | st.dictionaries(st.text(max_size=4), st.text()),
    max_size=6,
)


def valid_request() -> bytes:
    batch = ExpertBatch(
        hidden=torch.randn(3, HIDDEN),
        layer_ids=torch.zeros(3, dtype=torch.int64),
        expert_ids=torch.tensor([[0, 1], [2, -1], [1, 2]]),
        weights=torch.rand(3, 2),
    )
    return encode_batch(batch)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(body: bytes) -> None:
    decodes_or_refuses(body)


@FUZZ
@given(HEADER, st.binary(max_size=256))
def test_forged_safetensors_headers(header: dict, data: bytes) -> None:
    decodes_or_refuses(safetensors_body(header, data))


@FUZZ
@given(st.data())
def test_flipped_and_cut_payloads(data: st.DataObject) -> None:
    for body in (valid_request(), encode_output(torch.randn(2, HIDDEN))):
        mangled = bytearray(body)
        for position in data.draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=8)):
            mangled[position] ^= data.draw(st.integers(1, 255))
        decodes_or_refuses(bytes(mangled))
        decodes_or_refuses(body[: data.draw(st.integers(0, len(body) - 1))])


def any_tensor(shapes: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[torch.Tensor]:
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                              torch.int64, torch.int32, torch.uint8, torch.bool])  # fmt: skip

    def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        values = torch.randint(-3, EXPERTS + 2, shape, generator=generator)  # ids near and beyond the held ones
        return (
            values.to(dtype)
            if not dtype.is_floating_point
            else (values + torch.rand(shape, generator=generator)).to(dtype)
        )

    return st.builds(make, shapes, dtypes, st.integers(0, 2**16))


def held_experts() -> Invoker:
    generator = torch.Generator().manual_seed(0)
    experts = {
        (0, e): ExpertWeights(torch.randn(2 * INTERMEDIATE, HIDDEN, generator=generator),
                              torch.randn(HIDDEN, INTERMEDIATE, generator=generator))
        for e in range(EXPERTS)
    }  # fmt: skip
    return Invoker(ExpertSet(experts, "silu"))


INVOKE = held_experts()


@FUZZ
@given(st.data())
def test_any_tensors_through_the_whole_invocation(data: st.DataObject) -> None:
    rows = data.draw(st.integers(0, 3))
    shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple) | st.sampled_from([(rows,), (rows, 2), (rows, HIDDEN)])
    tensors = {name: data.draw(any_tensor(shapes)) for name in REQUEST_FIELDS}
    try:
        output = decode_output(INVOKE(save(tensors)))
    except BadRequest:
        return
    assert output.shape == (tensors["hidden"].shape[0], HIDDEN) and output.dtype == torch.float32
