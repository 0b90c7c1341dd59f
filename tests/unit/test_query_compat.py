"""registry/compat.py: when a version's queries may search a collection pinned to another."""

import numpy as np

from encoders.contract import VectorContract
from registry.compat import load_map, map_queries, query_compat
from registry.manifest import Compatibility, Manifest

CONTRACT = VectorContract(dimension=4, normalized=True, similarity="cosine", modalities=("text",))


def manifest(*records: Compatibility) -> Manifest:
    return Manifest(contract=CONTRACT, trained=True, compatible_with=list(records))


def test_same_version_is_allowed():
    assert query_compat("shapes/1", manifest(), "shapes/1", "aa").allowed


def test_compatible_version_is_allowed_with_its_record():
    record = Compatibility(ref="shapes/1", weights_sha256="aa" * 32)
    answer = query_compat("shapes/2", manifest(record), "shapes/1", "aa" * 32)
    assert answer.allowed and answer.record == record


def test_version_without_a_record_is_refused_with_reason():
    answer = query_compat("shapes/3", manifest(Compatibility(ref="shapes/0")), "shapes/1", None)
    assert not answer.allowed
    assert "not registered compatible with shapes/1" in answer.reason


def test_changed_pinned_weights_break_the_claim():
    record = Compatibility(ref="shapes/1", weights_sha256="aa" * 32)
    answer = query_compat("shapes/2", manifest(record), "shapes/1", "bb" * 32)
    assert not answer.allowed
    assert "now has weights bbbbbbbbbbbb" in answer.reason


def test_map_undoes_a_rotation(tmp_path):
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    old = rng.normal(size=(3, 4)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    new = old @ rotation  # v2's vectors are a rotation of v1's
    np.save(tmp_path / "map.npy", rotation.T.astype(np.float32))
    mapping = load_map(tmp_path, Compatibility(ref="shapes/1", map_file="map.npy"))
    assert not np.allclose(map_queries(new, None), old, atol=1e-3)
    np.testing.assert_allclose(map_queries(new, mapping), old, atol=1e-5)


def test_no_map_file_means_no_map(tmp_path):
    assert load_map(tmp_path, Compatibility(ref="shapes/1")) is None
