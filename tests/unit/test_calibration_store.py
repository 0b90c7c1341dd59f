"""registry.calibration: the calibration file beside a version, first writer wins, never inside
the hashed artifact folder."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from encoders.encoder import describe, load_sentence_transformer
from registry.calibration import (
    CALIBRATION_FILE,
    Calibration,
    calibration_path,
    publish_calibration,
    read_calibration,
)
from registry.manifest import Lineage, Manifest
from registry.store import ModelRegistry


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_model_dir):
    registry = ModelRegistry.embedded(tmp_path_factory.mktemp("registry"))
    contract = describe(load_sentence_transformer(tiny_model_dir))
    manifest = Manifest(contract=contract, trained=False, lineage=Lineage(base_model="config"))
    first = registry.register("tiny", tiny_model_dir, manifest)
    second = registry.register("tiny", tiny_model_dir, manifest)
    return registry, first, second


def _calibration(info, fill: float) -> Calibration:
    rows = np.full((3, info.manifest.contract.dimension), fill, dtype="<f4")
    return Calibration(
        ref=info.ref,
        weights_sha256=info.manifest.lineage.weights_sha256,
        sample="test",
        sample_sha256="0" * 64,
        count=3,
        dimension=rows.shape[1],
        embeddings_b64=base64.b64encode(rows.tobytes()).decode(),
    )


def _clear(info) -> None:
    calibration_path(info).unlink(missing_ok=True)


def test_published_beside_the_version_and_the_version_still_verifies(versions):
    registry, first, _ = versions
    _clear(first)
    assert read_calibration(first) is None
    stored = publish_calibration(first, _calibration(first, 0.5))
    path = calibration_path(first)
    assert path.name == CALIBRATION_FILE and path.parent == first.path.parent
    assert not (first.path / CALIBRATION_FILE).exists()
    registry.get_version("tiny", first.version, verify=True)  # the artifact's hash is untouched
    assert read_calibration(first) == stored
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".calibration-")]  # no temp file left


def test_first_writer_wins(versions):
    _, first, _ = versions
    _clear(first)
    winner = publish_calibration(first, _calibration(first, 0.25))
    loser = publish_calibration(first, _calibration(first, 0.75))
    assert loser == winner and read_calibration(first) == winner


def test_each_version_has_its_own_and_ignores_anothers(versions):
    _, first, second = versions
    _clear(first)
    _clear(second)
    assert calibration_path(first) != calibration_path(second)
    publish_calibration(first, _calibration(first, 0.5))
    assert read_calibration(second) is None
    with pytest.raises(ValueError, match="cannot be stored"):
        publish_calibration(second, _calibration(first, 0.5))
    # A file another version wrote (copied over by hand, say) is not used, and is replaced.
    calibration_path(second).write_text(calibration_path(first).read_text())
    assert read_calibration(second) is None
    mine = publish_calibration(second, _calibration(second, 0.1))
    assert read_calibration(second) == mine


def test_a_corrupt_file_counts_as_none_and_is_replaced(versions):
    _, first, _ = versions
    calibration_path(first).write_text("{not json")
    assert read_calibration(first) is None
    cut = _calibration(first, 0.3).model_dump()
    cut["embeddings_b64"] = cut["embeddings_b64"][:-8]  # a truncated copy: the shape no longer fits
    calibration_path(first).write_text(json.dumps(cut))
    assert read_calibration(first) is None
    fresh = publish_calibration(first, _calibration(first, 0.3))
    assert read_calibration(first) == fresh


def test_an_unreadable_path_counts_as_none(versions):
    _, first, _ = versions
    path = calibration_path(first)
    path.unlink(missing_ok=True)
    path.mkdir()
    try:
        assert read_calibration(first) is None
        with pytest.raises(OSError):  # the service logs it and keeps the calibration in memory
            publish_calibration(first, _calibration(first, 0.3))
    finally:
        path.rmdir()
