"""The offline tokenizer loads with transformers, round-trips text and renders ChatML."""

from __future__ import annotations

from transformers import AutoTokenizer

from faasmoe.model.tokenizer import build_tokenizer


def test_round_trip_chat_template_and_ids_in_vocab(tmp_path):
    build_tokenizer(tmp_path, vocab_size=512)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello, world! def f(x): return x ** 2  # ünïcode 😀"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < 512
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_build_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a", vocab_size=151936)
    build_tokenizer(tmp_path / "b", vocab_size=151936)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
