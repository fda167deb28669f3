"""Shared fixtures: small random checkpoints in the real Hugging Face format, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faasmoe.model.init_model import InitModelOptions, init_model

# Exactness across processes needs one intra-op thread count everywhere (see faasmoe/experts/compute.py).
TEST_THREADS = 1
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model(models_dir: Path, name: str, options: InitModelOptions) -> Path:
    path = models_dir / name
    if not (path / "config.json").exists():
        init_model(path, options)
    return path


@pytest.fixture(scope="session")
def tiny_bf16(models_dir: Path) -> Path:
    return _model(models_dir, "tiny-bf16", InitModelOptions(preset="tiny", dtype="bfloat16", seed=1))


@pytest.fixture(scope="session")
def tiny_fp32(models_dir: Path) -> Path:
    return _model(models_dir, "tiny-fp32", InitModelOptions(preset="tiny", dtype="float32", seed=2))


@pytest.fixture(scope="session")
def mixed_fp32(models_dir: Path) -> Path:
    return _model(models_dir, "mixed-fp32", InitModelOptions(preset="small-mixed", dtype="float32", seed=3))


@pytest.fixture(scope="session")
def tiny_sharded(models_dir: Path) -> Path:
    return _model(
        models_dir, "tiny-sharded", InitModelOptions(preset="tiny", dtype="float32", seed=4, max_shard_size="300KB")
    )


# The other MoE families (faasmoe/model/families.py), written by transformers' own classes in their hub layout.
@pytest.fixture(scope="session")
def qwen3_fp32(models_dir: Path) -> Path:
    return _model(models_dir, "qwen3-fp32", InitModelOptions(preset="qwen3-tiny", dtype="float32", seed=5))


@pytest.fixture(scope="session")
def qwen3_bf16(models_dir: Path) -> Path:
    return _model(models_dir, "qwen3-bf16", InitModelOptions(preset="qwen3-tiny", dtype="bfloat16", seed=6))


@pytest.fixture(scope="session")
def mixtral_fp32(models_dir: Path) -> Path:
    return _model(models_dir, "mixtral-fp32", InitModelOptions(preset="mixtral-tiny", dtype="float32", seed=7))


@pytest.fixture(scope="session")
def mixtral_bf16(models_dir: Path) -> Path:
    return _model(models_dir, "mixtral-bf16", InitModelOptions(preset="mixtral-tiny", dtype="bfloat16", seed=8))
