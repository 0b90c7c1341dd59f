"""output_dtype through a runtime variant (issue 13 parts 1 and 3 together): a version's calibration
is embedded by the version itself even when a variant is asked first, and the variant's int8 bytes
are quantize_embeddings of its own vectors with that calibration."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings
from typer.testing import CliRunner

from encoders.calibration_texts import CALIBRATION_TEXTS
from registry.calibration import read_calibration
from service.quantized_output import decode_sample
from tests.helpers import RunningServer, cosine, make_settings

TEXTS = ["A man is playing a guitar.", "A cat sleeps on the sofa.", "short"]


pytestmark = pytest.mark.slow  # an ONNX export and a server of its own: about a minute


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """tiny/1 with its onnx-fp32 variant made by `duet models optimize`, behind a running server
    that has loaded only the variant."""
    from duet.cli import app
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Manifest
    from service.state import open_registry

    data_dir = tmp_path_factory.mktemp("dtype-variants")
    settings = make_settings(data_dir, preload_models=[], register_default_models=False)
    registry = open_registry(settings)
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
    pairs = data_dir / "pairs.tsv"
    pairs.write_text("".join(f"{i % 5}.0\tA dog runs number {i}.\tA dog is running, {i}.\n" for i in range(30)))
    args = ["models", "optimize", "tiny/1", "--backend", "onnx", "--eval", str(pairs), "--data-dir", str(data_dir)]
    result = CliRunner().invoke(app, args, env={"DUET_REGISTER_DEFAULT_MODELS": "false"})
    assert result.exit_code == 0, result.output
    with RunningServer(settings) as server:
        yield server


def test_a_variant_asked_first_is_calibrated_by_its_version(served, tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    with httpx.Client(base_url=served.url, timeout=120) as client:
        body = {"model": "tiny/1:onnx-fp32", "input": TEXTS}
        floats = client.post("/v1/embeddings", json=body)
        assert "tiny/1" not in served.state.pool.loaded  # only the variant so far
        quantised = client.post("/v1/embeddings", json={**body, "output_dtype": "int8"})
    assert floats.status_code == quantised.status_code == 200, quantised.text
    assert quantised.json()["model"] == "tiny/1:onnx-fp32" and quantised.json()["output_dtype"] == "int8"
    stored = read_calibration(served.state.registry.resolve("tiny/1"))
    assert stored is not None and stored.ref == "tiny/1"
    calibration = decode_sample(stored)
    torch_model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    # The sample was embedded by tiny/1 itself (loaded for it), not by the variant that asked.
    assert "tiny/1" in served.state.pool.loaded
    expected_sample = torch_model.encode(list(CALIBRATION_TEXTS), normalize_embeddings=True)
    assert cosine(calibration, expected_sample).min() >= 0.9999
    vectors = np.array([d["embedding"] for d in floats.json()["data"]], dtype=np.float32)
    expected = quantize_embeddings(vectors, precision="int8", calibration_embeddings=calibration)
    got = np.array([d["embedding"] for d in quantised.json()["data"]], dtype=np.int8)
    np.testing.assert_array_equal(got, expected)
