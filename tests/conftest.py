"""Pytest fixtures; the plain helpers live in helpers.py (importable from tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import build_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer):
    cache: dict[tuple, Path] = {}

    def factory(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, json.dumps(overrides, sort_keys=True))  # (overrides may hold lists and dicts)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[key] = make_tiny_model(d, model_type, tiny_tokenizer, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
