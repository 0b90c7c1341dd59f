from __future__ import annotations

import pytest

from encoders.encoder import describe, load_sentence_transformer
from registry.errors import IntegrityError, InvalidNameError, ModelNotFoundError, VersionNotFoundError
from registry.manifest import Lineage, Manifest
from registry.store import ModelRegistry
from tests.helpers import embedded_registry


@pytest.fixture()
def registry(tmp_path) -> ModelRegistry:
    return embedded_registry(tmp_path / "registry")


@pytest.fixture(scope="module")
def tiny_manifest(tiny_model_dir) -> Manifest:
    contract = describe(load_sentence_transformer(tiny_model_dir))
    return Manifest(contract=contract, trained=False, description="tiny", lineage=Lineage(base_model="config"))


def test_versions_are_numbered_and_aliases_move(registry, tiny_model_dir, tiny_manifest):
    first = registry.register("tiny", tiny_model_dir, tiny_manifest, aliases=("production",))
    second = registry.register("tiny", tiny_model_dir, tiny_manifest)
    assert (first.version, second.version) == (1, 2)
    assert registry.resolve("tiny").version == 1
    assert registry.resolve("tiny@latest").version == 2
    registry.set_alias("tiny", "production", 2)
    registry.set_alias("tiny", "staging", 1)
    assert registry.resolve("tiny").version == 2
    assert registry.resolve("tiny@staging").version == 1
    assert registry.aliases("tiny") == {"production": 2, "staging": 1}
    assert [v.version for v in registry.list_versions("tiny")] == [1, 2]
    [summary] = registry.list_models()
    assert summary.name == "tiny" and summary.latest_version == 2


def test_manifest_travels_with_the_artifact(registry, tiny_model_dir, tiny_manifest):
    info = registry.register("tiny", tiny_model_dir, tiny_manifest)
    assert info.manifest.contract == tiny_manifest.contract
    assert info.manifest.trained is False
    assert len(info.manifest.lineage.weights_sha256 or "") == 64
    assert (info.path / "duet_manifest.json").is_file()
    assert info.path != tiny_model_dir  # copied into the registry, not referenced
    # A fresh registry object on the same folder sees the same version.
    again = ModelRegistry.embedded(registry_root(registry)).resolve("tiny@latest")
    assert again.manifest == info.manifest


def registry_root(registry: ModelRegistry):
    from pathlib import Path

    return Path(registry.tracking_uri.removeprefix("sqlite:///")).parent


def test_modified_version_fails_verification(registry, tiny_model_dir, tiny_manifest):
    info = registry.register("tiny", tiny_model_dir, tiny_manifest)
    registry.verify(info)
    weights = next(info.path.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="modified after registration"):
        registry.get_version("tiny", info.version, verify=True)


def test_lookup_errors_name_what_is_missing(registry, tiny_model_dir, tiny_manifest):
    registry.register("tiny", tiny_model_dir, tiny_manifest, aliases=("production",))
    with pytest.raises(ModelNotFoundError, match="no model named 'other'"):
        registry.resolve("other")
    with pytest.raises(VersionNotFoundError, match="no version 9"):
        registry.resolve("tiny/9")
    with pytest.raises(VersionNotFoundError, match="aliases: production"):
        registry.resolve("tiny@staging")
    with pytest.raises(VersionNotFoundError):
        registry.set_alias("tiny", "staging", 5)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "with space", ""])
def test_register_rejects_unsafe_names(registry, tiny_model_dir, tiny_manifest, name):
    with pytest.raises(InvalidNameError):
        registry.register(name, tiny_model_dir, tiny_manifest)


def test_register_refuses_a_folder_that_is_not_a_model(registry, tmp_path, tiny_manifest):
    from registry.errors import RegistryError

    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="modules.json"):
        registry.register("tiny", tmp_path / "empty", tiny_manifest)


def test_default_models_are_registered_once(bootstrapped_data_dir):
    from service.bootstrap import register_default_models
    from service.settings import Settings
    from service.state import open_registry

    registry = open_registry(Settings(data_dir=bootstrapped_data_dir))
    assert register_default_models(registry, bootstrapped_data_dir) == []
    minilm = registry.resolve("minilm")
    dual = registry.resolve("minilm-dual")
    assert minilm.manifest.trained and not dual.manifest.trained
    assert minilm.manifest.contract.modalities == ("text",)
    assert dual.manifest.contract.modalities == ("text", "image")
    assert dual.manifest.lineage.architecture["image_tower"]["image_size"] == 64
    assert "torch" in minilm.manifest.lineage.library_versions
