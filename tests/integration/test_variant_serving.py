"""Variants end to end (issue 13): `duet models optimize` derives and gates one, the server answers
`/v1/embeddings` with it when a request names it (the default model unchanged), GET /v1/models shows
the gate's numbers, and a refused, missing or malformed variant is a 4xx saying what to do."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.helpers import RunningServer, make_settings

TEXTS = ["A man is playing a guitar.", "A cat sleeps on the sofa."]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A data dir with tiny/1 registered, its onnx-fp32 variant made by the CLI, and a refused
    onnx-int8 (real files, a record whose gate failed), behind a running server. (fp32 for the
    passing one: a random tiny model's int8 Spearman on 30 pairs could fall either side of the gate.)"""
    from duet.cli import app
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import FidelityReport, Manifest
    from service.state import open_registry

    data_dir = tmp_path_factory.mktemp("variants")
    settings = make_settings(data_dir, preload_models=["tiny/1"], register_default_models=False)
    registry = open_registry(settings)
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    info = registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))

    pairs = data_dir / "pairs.tsv"
    pairs.write_text("".join(f"{i % 5}.0\tA dog runs number {i}.\tA dog is running, {i}.\n" for i in range(30)))
    env = {"DUET_REGISTER_DEFAULT_MODELS": "false"}
    args = ["models", "optimize", "tiny/1", "--backend", "onnx", "--eval", str(pairs)]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)], env=env)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output and "tiny/1:onnx-fp32" in result.output

    good = registry.get_variant(info, "onnx-fp32")
    staged = data_dir / "staged"
    shutil.copytree(good.path, staged)
    (staged / "duet_variant.json").unlink()
    refused = good.record.fidelity.model_dump() | {
        "passed": False,
        "cosine_min": 0.95,
        "reasons": ["lowest cosine to fp32 0.9500 < 0.99"],
    }
    record = good.record.model_copy(
        update={"name": "onnx-int8", "precision": "int8", "fidelity": FidelityReport(**refused)}
    )
    registry.save_variant(info, staged, record)
    with RunningServer(settings) as server:
        yield server


def embed(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": model, "input": TEXTS})


def test_a_request_naming_a_variant_is_answered_by_it(served):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        plain = embed(client, "tiny")
        variant = embed(client, "tiny/1:onnx-fp32")
        by_alias = embed(client, "tiny:onnx-fp32")
    assert plain.status_code == variant.status_code == by_alias.status_code == 200, variant.text
    assert plain.json()["model"] == "tiny/1"  # the default path is unchanged
    assert variant.json()["model"] == by_alias.json()["model"] == "tiny/1:onnx-fp32"
    a = np.array([d["embedding"] for d in plain.json()["data"]])
    b = np.array([d["embedding"] for d in variant.json()["data"]])
    assert np.sum(a * b, axis=1).min() > 0.9999  # both normalised: the dot product is the cosine
    assert variant.json()["usage"] == plain.json()["usage"]
    assert "tiny/1:onnx-fp32" in served.state.pool.loaded


def test_get_model_shows_the_gates_numbers(served):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        assert embed(client, "tiny:onnx-fp32").status_code == 200
        card = client.get("/v1/models/tiny:onnx-fp32")
        base = client.get("/v1/models/tiny")
    assert card.status_code == 200, card.text
    fidelity = card.json()["variant"]["fidelity"]
    assert fidelity["passed"] is True and fidelity["cosine_min"] >= 0.99 and fidelity["pairs"] == 30
    assert {"spearman", "spearman_fp32", "spearman_drop", "cosine_mean"} <= set(fidelity)
    assert card.json()["variant"]["source_ref"] == "tiny/1" and card.json()["id"] == "tiny:onnx-fp32"
    assert card.json()["loaded"] is True
    variants = base.json()["variants"]
    assert variants["onnx-fp32"]["fidelity"]["passed"] and not variants["onnx-int8"]["fidelity"]["passed"]


def test_refused_missing_and_malformed_variants_are_4xx_with_what_to_do(served):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        refused = embed(client, "tiny/1:onnx-int8")
        missing = embed(client, "tiny/1:openvino-int8")
        malformed = embed(client, "tiny/1:tensorrt-int4")
    assert refused.status_code == 400
    assert "refused" in refused.json()["error"]["message"] and "0.9500" in refused.json()["error"]["message"]
    assert missing.status_code == 404
    assert "duet models optimize tiny/1 --backend openvino --int8" in missing.json()["error"]["message"]
    assert malformed.status_code == 400 and "onnx-int8" in malformed.json()["error"]["message"]
