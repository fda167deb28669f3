"""One invocation: safetensors request body -> the held experts' partial sums -> safetensors response body.

The maths is faasmoe.experts.compute's; this module only adapts it to bytes in and bytes out.
"""

from __future__ import annotations

import torch

from faasmoe.experts.compute import ExpertSet
from faasmoe.experts.wire import CONTENT_TYPE, decode_batch, encode_output


class Invoker:
    content_type = CONTENT_TYPE

    def __init__(self, experts: ExpertSet) -> None:
        self.experts = experts

    def __call__(self, body: bytes) -> bytes:
        """Raises faasmoe.errors.BadRequest for a malformed body or one asking for experts not held here."""
        batch = decode_batch(body)
        with torch.inference_mode():
            output = self.experts.partial_sum(batch)
        return encode_output(output)

    def held(self) -> list[tuple[int, int]]:
        return sorted(self.experts.experts)

    def nbytes(self) -> int:
        return self.experts.nbytes()

    @staticmethod
    def threads() -> int:
        return torch.get_num_threads()
