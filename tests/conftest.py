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

# The fast suite (`pytest --fast`, well under the full run) leaves out the tests marked `heavy`: every
# integration test (real servers, Redis, Milvus, browsers, training jobs) and the unit tests below, which
# load the full MiniLM, train, export models or start processes. One list here rather than a marker in
# each file, so what the fast suite skips is read in one place; the default run (`pytest`, CI) runs them.
HEAVY_UNIT_TESTS: dict[str, tuple[str, ...]] = {  # module -> test-name prefixes ("" = the whole module)
    "test_losses_distributed.py": ("",),  # torchrun
    "test_packing.py": ("",),  # MiniLM traced and packed
    "test_variants.py": ("",),  # ONNX / OpenVINO exports
    "test_calibration_store.py": ("",),
    "test_evaluation.py": ("test_minilm_",),
    "test_losses.py": ("test_each_loss_trains_inside", "test_cached_equals", "test_matryoshka_with_cached"),
    "test_losses_momentum.py": ("test_cached_equals", "test_trains_inside"),
    "test_logs.py": ("test_the_worker_and_the_training_process", "test_a_job_keeps", "test_the_response_header"),
    "test_cli.py": ("test_register_and_alias", "test_models_list"),
    "test_encoder.py": ("test_dual_encoder_round_trips", "test_token_counts"),
    "test_worker_heartbeat.py": ("",),
    "test_registry.py": ("test_default_models_are_registered_once",),
    "test_compat_training.py": ("",),  # trains tiny v2s against v1 (and loads MiniLM as an old model)
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true", help="the fast suite: leave out tests marked heavy (see tests/conftest.py)"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the marks must be on the items by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        prefixes = HEAVY_UNIT_TESTS.get(path.name, ()) if path.parent.name == "unit" else ("",)  # else all
        if any(item.name.startswith(prefix) for prefix in prefixes):
            item.add_marker(pytest.mark.heavy)
    if config.getoption("--fast"):
        kept = [item for item in items if item.get_closest_marker("heavy") is None]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


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


@pytest.fixture(scope="module")
def pages_client() -> Iterator[object]:
    """An app holding only the pages router (the jobs page, the playground, their shared API client):
    the page checks run in milliseconds without a model or a registry."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.routes import pages

    app = FastAPI()
    app.include_router(pages.router)
    with TestClient(app) as client:
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
