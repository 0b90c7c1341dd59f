"""Hostile inputs against searching a pinned collection with a compatible version (issue 14 part 2): a
manifest claim whose new -> old map file is missing, truncated, not a matrix, the wrong shape, NaN, or a
path out of the artifact folder, and garbage model references. Each is a 4xx naming what to use instead,
never a 500, and the server keeps answering with the pinned version afterwards (faiss backend)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.helpers import RunningServer, make_settings

MAP_FILE = "compat_map.npy"
TEXTS = {"guitar": "A man is playing a guitar.", "cat": "A cat sleeps on the sofa.", "soup": "A chef cooks soup."}


def _bad_maps(dim: int) -> dict[str, object]:
    """Version label -> what replaces its map file (bytes written as they are, an array saved as .npy,
    None: no file), in registration order cm/2, cm/3, ..."""
    nan = np.eye(dim, dtype=np.float32)
    nan[0, 0] = np.nan
    return {
        "missing": None,
        "truncated": np.eye(dim, dtype=np.float32),  # cut below after saving
        "vector": np.ones(dim, dtype=np.float32),
        "wide": np.eye(dim, dim + 3, dtype=np.float32),
        "tall": np.eye(dim + 2, dim, dtype=np.float32),
        "nan": nan,
        "garbage": b"not a numpy file at all",
        "cube": np.ones((dim, dim, 2), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import MANIFEST_FILE, Compatibility, Manifest
    from service.state import open_registry

    settings = make_settings(
        tmp_path_factory.mktemp("compat-hostile") / "data", preload_models=["cm/1"], register_default_models=False
    )
    registry = open_registry(settings)
    contract = describe(load_sentence_transformer(tiny_model_dir))
    v1 = registry.register("cm", tiny_model_dir, Manifest(contract=contract, trained=True))
    refs: dict[str, str] = {}
    for label, content in _bad_maps(contract.dimension).items():
        folder = tmp_path_factory.mktemp(f"v-{label}") / "model"
        shutil.copytree(tiny_model_dir, folder)
        if isinstance(content, bytes):
            (folder / MAP_FILE).write_bytes(content)
        elif isinstance(content, np.ndarray):
            np.save(folder / MAP_FILE, content)
        if label == "truncated":
            data = (folder / MAP_FILE).read_bytes()
            (folder / MAP_FILE).write_bytes(data[: len(data) // 2])
        record = Compatibility(ref="cm/1", weights_sha256=v1.manifest.lineage.weights_sha256, map_file=MAP_FILE)
        manifest = Manifest(contract=contract, trained=True, compatible_with=[record])
        refs[label] = registry.register("cm", folder, manifest).ref
    # a map_file that climbs out of the artifact folder to a real .npy (the v1 'eye' one of another version)
    outside = tmp_path_factory.mktemp("outside") / "m.npy"
    np.save(outside, np.eye(contract.dimension, dtype=np.float32))
    record = Compatibility(ref="cm/1", weights_sha256=v1.manifest.lineage.weights_sha256, map_file=str(outside))
    refs["absolute"] = registry.register(
        "cm", tiny_model_dir, Manifest(contract=contract, trained=True, compatible_with=[record])
    ).ref
    record = record.model_copy(update={"map_file": "../../../../../../../../" + str(outside).lstrip("/")})
    refs["climbing"] = registry.register(
        "cm", tiny_model_dir, Manifest(contract=contract, trained=True, compatible_with=[record])
    ).ref
    # no map, and a contract of another width than cm/1's (as a compatible model of another size would have)
    narrow = contract.model_copy(update={"dimension": contract.dimension // 2})
    record = Compatibility(ref="cm/1", weights_sha256=v1.manifest.lineage.weights_sha256)
    refs["narrow"] = registry.register(
        "cm", tiny_model_dir, Manifest(contract=narrow, trained=True, compatible_with=[record])
    ).ref
    for label, text in {"not-json": "{", "bad-claims": '{"compatible_with": "cm/1"}'}.items():
        broken = registry.register("cm", tiny_model_dir, Manifest(contract=contract, trained=True))
        (broken.path / MANIFEST_FILE).write_text(text)
        refs[label] = broken.ref
    with RunningServer(settings) as server:
        yield server, refs


@pytest.fixture()
def http(running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running[0].url, timeout=60) as client:
        yield client


@pytest.fixture()
def collection(http) -> str:
    name = "h" + uuid.uuid4().hex[:10]
    assert http.post("/v1/collections", json={"name": name, "model": "cm/1"}).status_code == 201
    items = [{"id": k, "text": t} for k, t in TEXTS.items()]
    assert http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    return name


def search(http, name: str, model: object) -> httpx.Response:
    return http.post(f"/v1/collections/{name}/search", json={"query": {"text": "a cat"}, "k": 3, "model": model})


UNUSABLE = [
    "missing",
    "truncated",
    "vector",
    "wide",
    "tall",
    "nan",
    "garbage",
    "cube",
    "absolute",
    "climbing",
    "narrow",
]


@pytest.mark.parametrize("label", UNUSABLE)
def test_an_unusable_map_is_a_409_naming_the_pinned_version(http, running, collection, label):
    ref = running[1][label]
    answer = search(http, collection, ref)
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["param"] == "model"
    assert ref in error["message"] and "search with cm/1" in error["message"]
    again = search(http, collection, "cm/1")  # the server still answers with the pinned version
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ("../../x", 400),
        ("cm/../../etc", 400),
        ("cm/999", 404),
        ("cm@nowhere", 404),
        ("nosuch/1", 404),
        ("çm/1", 400),
        ("cm/-1", 400),
        ("cm/99999999999999999999999", 400),
        (123, 400),
        (["cm/1"], 400),
    ],
)
def test_garbage_model_references_are_client_errors(http, collection, model, status):
    answer = search(http, collection, model)
    assert answer.status_code == status, answer.text


@pytest.mark.parametrize("label", ["not-json", "bad-claims"])
def test_a_version_whose_manifest_cannot_be_read_is_a_409_naming_it(http, running, collection, label):
    ref = running[1][label]
    for answer in (
        search(http, collection, ref),
        http.post("/v1/embeddings", json={"model": ref, "input": ["a cat"]}),
    ):
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "model_manifest_unreadable"
        assert f"{ref}'s manifest cannot be read" in answer.json()["error"]["message"]
    info = http.get(f"/v1/collections/{collection}")  # the same connection still answers; the scan skips it
    assert info.status_code == 200, info.text
    assert ref not in [m["model"] for m in info.json()["compatible_models"]]


def test_the_versions_listing_leaves_out_unreadable_manifests(http, running):
    answer = http.get("/v1/models/cm/versions")
    assert answer.status_code == 200, answer.text
    listed = {version["ref"] for version in answer.json()["data"]}
    assert "cm/1" in listed and running[1]["nan"] in listed
    assert not listed & {running[1]["not-json"], running[1]["bad-claims"]}


@pytest.mark.parametrize("label", UNUSABLE)
def test_a_require_compatible_move_to_a_version_with_an_unusable_map_is_refused(http, running, label):
    assert http.put("/v1/models/cm/aliases/hostile", json={"version": 1}).status_code == 200
    ref = running[1][label]
    body = {"version": int(ref.split("/")[1]), "require_compatible": True}
    answer = http.put("/v1/models/cm/aliases/hostile", json=body)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "alias_move_refused"
    assert ref in answer.json()["error"]["message"]
    assert http.get("/v1/models/cm/aliases").json()["hostile"] == 1
