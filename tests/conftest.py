"""Shared fixtures: real models from the bundled wheel, a real registry, a real server.

Expensive things (the bootstrapped registry, a running app) are session-scoped and shared;
tests that change registry state build their own registry in `tmp_path`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import RunningServer, make_settings

# The collection contract suite's `backend` fixtures (faiss and milvus), for every test module.
pytest_plugins = ["tests.integration.backends"]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from encoders.defaults import bundled_minilm_path

    return bundled_minilm_path()


@pytest.fixture(scope="session")
def reference_model(minilm_path):
    """Plain sentence-transformers on the same folder: what the service must match."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def bootstrapped_data_dir(tmp_path_factory) -> Path:
    """A data dir whose registry already holds the default models (registered once per session)."""
    from service.bootstrap import register_default_models
    from service.settings import Settings
    from service.state import open_registry

    data_dir = tmp_path_factory.mktemp("duet-data")
    settings = Settings(data_dir=data_dir)
    register_default_models(open_registry(settings), data_dir)
    return data_dir


@pytest.fixture(scope="session")
def server(bootstrapped_data_dir) -> Iterator[RunningServer]:
    with RunningServer(make_settings(bootstrapped_data_dir)) as running:
        yield running


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, 32-wide BERT sentence-transformer built from a config (no download), with
    all-MiniLM's tokenizer: a real model folder that registers and loads in milliseconds."""
    from encoders.tiny import build_tiny_text_model

    return build_tiny_text_model(minilm_path, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory) -> Iterator[str]:
    """A real Milvus endpoint (milvus-lite's gRPC server): `DUET_TEST_MILVUS_URI` when CI started one
    (`.ci/run`), else a private `milvus-lite server` for this session. Tests namespace their collections
    with a unique prefix, so runs sharing one server never meet."""
    import os

    from tests.helpers import MilvusLiteServer

    uri = os.environ.get("DUET_TEST_MILVUS_URI")
    if uri:
        yield uri
        return
    with MilvusLiteServer(tmp_path_factory.mktemp("milvus")) as running:
        yield running.uri
