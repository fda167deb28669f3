"""Detokenization time of one streamed decode: TextStream (incremental) against a full decode at every step.

Usage: python benchmarks/detokenize_bench.py [--tokens 500,1000,2000,4000] [--repeats 3] [--model DIR]

The tokens are the package's corpus (with some multi-byte text mixed in) encoded by the offline Qwen-style
byte-level BPE tokenizer (or --model's tokenizer), fed one at a time as a decode would, with a stop string
that never occurs (so its look-behind runs at every step and the whole sequence is decoded). The baseline
is the detokenizer faasmoe had before: decode all ids so far at each step, then hand out what is new; its
time per token grows with the length (quadratic in total), TextStream's stays flat (linear).
Figures are reported, not asserted (this machine may be shared); the best of --repeats runs is shown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from faasmoe.model.tokenizer import build_tokenizer
from faasmoe.server.generation import TextStream

STOP = ["<|never in the text|>"]
MULTI_BYTE = "Grüße, naïve café — 中文 テキスト 😀🚀\n"


class FullDecodeStream:
    """The baseline: the whole sequence is decoded again at every step (faasmoe's detokenizer before)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.ids, self.emitted = tokenizer, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(self.emitted - self.hold, 0)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._take(text, cut)
        end = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete character
            end = min(end, len(text) - 1)
        return self._take(text, end)

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : end], end
        return piece


def token_ids(tokenizer: PreTrainedTokenizerBase, count: int) -> list[int]:
    corpus = resources.files("faasmoe.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    lines = [line + "\n" + MULTI_BYTE for line in corpus.splitlines() if line]
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode("".join(lines))
    return ids[:count]


def detokenize(make: Callable[[], FullDecodeStream | TextStream], ids: list[int]) -> tuple[float, str]:
    """Seconds to stream ids through a fresh detokenizer, and the text it handed out."""
    started = time.perf_counter()
    stream = make()
    text = "".join(stream.add(i) for i in ids) + stream.flush()
    return time.perf_counter() - started, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="500,1000,2000,4000", help="decode lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a checkpoint whose tokenizer to use (default: the offline one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or Path(tmp)
        if args.model is None:
            build_tokenizer(model, vocab_size=151936)  # Qwen1.5-MoE's vocabulary size
        tokenizer = AutoTokenizer.from_pretrained(model)

    print(f"{'tokens':>6}  {'full decode ms':>14}  {'us/token':>8}  {'TextStream ms':>13}  {'us/token':>8}  speed-up")
    for count in (int(n) for n in args.tokens.split(",")):
        ids = token_ids(tokenizer, count)
        full = min(detokenize(lambda: FullDecodeStream(tokenizer, STOP), ids) for _ in range(args.repeats))
        new = min(detokenize(lambda: TextStream(tokenizer, STOP), ids) for _ in range(args.repeats))
        assert new[1] == full[1] == tokenizer.decode(ids, skip_special_tokens=True), "the two disagree on the text"
        print(f"{count:>6}  {full[0] * 1e3:>14.1f}  {full[0] / count * 1e6:>8.1f}  "
              f"{new[0] * 1e3:>13.1f}  {new[0] / count * 1e6:>8.1f}  {full[0] / new[0]:>7.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
