"""Shared fixtures: one tiny random Gemma 3 built per test session, nothing mocked."""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pokemon_gemma.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma3"), seed=0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found beside the checkout ({SHARED}); shared-data tests skipped")
    return SHARED


@pytest.fixture(scope="session")
def tiny_gemma4_dir(tmp_path_factory) -> Path:
    from pokemon_gemma.tiny_gemma4 import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma4"), seed=0)
