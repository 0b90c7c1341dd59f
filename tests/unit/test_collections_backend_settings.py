"""DUET_COLLECTIONS_BACKEND and DUET_MILVUS_*: what the settings accept and how the state opens the backend."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from pydantic import ValidationError

from service.settings import Settings
from service.state import CollectionsBackendMissingError, ServiceState, open_collections


def test_faiss_is_the_default_and_holds_the_data_dir_lock(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.collections_backend == "faiss"
    assert settings.holds_data_dir_lock
    backend = open_collections(settings.model_copy(update={"faiss_gpu": False}))
    try:
        assert backend.kind == "faiss"
    finally:
        backend.close()


def test_milvus_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DUET_COLLECTIONS_BACKEND", "milvus")
    monkeypatch.setenv("DUET_MILVUS_TOKEN", "root:Milvus")
    monkeypatch.setenv("DUET_MILVUS_PREFIX", "staging2")
    settings = Settings(data_dir=tmp_path)
    assert settings.collections_backend == "milvus"
    assert not settings.holds_data_dir_lock  # replicas share the data dir; Milvus serialises writers
    assert settings.milvus_uri_or_default == str(tmp_path / "milvus.db")
    assert settings.milvus_token is not None and settings.milvus_token.get_secret_value() == "root:Milvus"
    assert "root:Milvus" not in repr(settings)
    assert settings.milvus_prefix == "staging2"
    assert settings.milvus_timeout_seconds == 10
    monkeypatch.setenv("DUET_MILVUS_URI", "http://milvus:19530")
    assert Settings(data_dir=tmp_path).milvus_uri_or_default == "http://milvus:19530"


@pytest.mark.parametrize("prefix", ["", "my-prefix", "1st", "a.b", "x" * 41, "p_1", "_p"])
def test_a_milvus_prefix_milvus_cannot_name_is_refused(prefix):
    with pytest.raises(ValidationError, match="milvus_prefix"):
        Settings(milvus_prefix=prefix)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValidationError, match="collections_backend"):
        Settings(collections_backend="qdrant")


def test_milvus_without_pymilvus_is_one_clear_start_up_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pymilvus" else real(name, *a))
    settings = Settings(data_dir=tmp_path, collections_backend="milvus")
    assert "pip install 'duet[milvus]'" in (settings.missing_backend_package() or "")
    assert Settings(data_dir=tmp_path).missing_backend_package() is None  # faiss needs nothing extra
    with pytest.raises(CollectionsBackendMissingError, match=r"pip install 'duet\[milvus\]'"):
        asyncio.run(ServiceState.start(settings))
    assert not (tmp_path / "registry").exists()  # refused before anything was opened


def test_duet_serve_with_milvus_but_no_pymilvus_is_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from duet.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pymilvus" else real(name, *a))
    env = {"DUET_COLLECTIONS_BACKEND": "milvus", "DUET_LOG_FORMAT": "text"}
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--port", "1"], env=env)
    assert result.exit_code == 1, result.output
    assert "pip install 'duet[milvus]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "collections").exists()  # refused before the lock or anything else


def test_the_prefix_setting_states_the_milvus_backends_own_rule():
    from index.milvus.names import PREFIX_PATTERN

    assert Settings.model_fields["milvus_prefix"].metadata[0].pattern == f"^{PREFIX_PATTERN}$"  # $: Rust regex
