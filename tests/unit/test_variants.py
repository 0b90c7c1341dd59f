"""Optimised variants (issue 13): names, export + load on a tiny model for both runtimes and both
precisions, the fidelity gate refusing a variant that does not answer like its version, and the
registry keeping variants beside versions (tampering detected). Real MiniLM: marked slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoders.errors import VariantSpecError
from encoders.variants import VariantSpec, split_variant

VARIANTS = ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"]
CALIBRATION = [f"A short caption number {i} about a dog in a park." for i in range(16)]
TEXTS = ["A man is playing a guitar.", "A cat sleeps on the sofa.", "x", "Stocks fell sharply on Monday " * 8]


def test_variant_references_split_and_bad_names_say_what_to_use():
    assert split_variant("minilm/1:onnx-int8") == ("minilm/1", VariantSpec("onnx", "int8"))
    assert split_variant("minilm@staging:openvino-fp32") == ("minilm@staging", VariantSpec("openvino", "fp32"))
    assert split_variant("minilm") == ("minilm", None)
    with pytest.raises(VariantSpecError, match="onnx-fp32, onnx-int8, openvino-fp32, openvino-int8"):
        split_variant("minilm/1:tensorrt-int4")


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from encoders.fidelity import spearman

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 200).astype(float)  # many ties, like STS gold scores
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_gate_judges_each_threshold():
    from encoders.fidelity import judge

    common = dict(probe_texts=10, pairs=10, source="t", cosine_mean=0.999)
    assert judge(cosine_min=0.995, spearman_fp32=80.0, spearman_variant=79.6, **common)["passed"]
    low = judge(cosine_min=0.98, spearman_fp32=80.0, spearman_variant=80.0, **common)
    assert not low["passed"] and "lowest cosine to fp32 0.9800 < 0.99" in low["reasons"][0]
    drop = judge(cosine_min=0.999, spearman_fp32=80.0, spearman_variant=79.0, **common)
    assert not drop["passed"] and "1.00 points below fp32's 80.00" in drop["reasons"][0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    from encoders.export import export_variant

    folders = {}
    for name in VARIANTS:
        folder = tmp_path_factory.mktemp(name)
        export_variant(tiny_model_dir, VariantSpec.parse(name), folder, calibration_texts=CALIBRATION)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_variant_exports_loads_and_answers_like_torch(name, exported, tiny_model_dir):
    from encoders.encoder import Encoder
    from encoders.runtime import load_variant_encoder

    reference = Encoder.load(tiny_model_dir, device="cpu", packing="off")
    variant = load_variant_encoder(tiny_model_dir, exported[name], VariantSpec.parse(name), threads=1)
    assert variant.contract.is_compatible_with(reference.contract)
    expected, got = reference.encode(TEXTS, "text"), variant.encode(TEXTS, "text")
    assert got.shape == expected.shape and got.dtype == np.float32
    cosines = np.sum(expected * got, axis=1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() > (0.9999 if name.endswith("fp32") else 0.99), cosines
    assert variant.count_tokens(TEXTS) == reference.count_tokens(TEXTS)  # the same tokenizer and truncation


def test_gate_refuses_a_variant_that_answers_differently(tmp_path, exported, minilm_path):
    """A variant exported from another tiny model (other random weights) loaded as this one's: the gate
    measures it against the version in torch and refuses it, naming the numbers."""
    from encoders.encoder import Encoder
    from encoders.fidelity import bundled_pairs_path, load_pairs, measure
    from encoders.runtime import load_variant_encoder
    from encoders.tiny import build_tiny_text_model

    other = build_tiny_text_model(minilm_path, tmp_path / "other")
    reference = Encoder.load(other, device="cpu", packing="off")
    wrong = load_variant_encoder(other, exported["onnx-fp32"], VariantSpec.parse("onnx-fp32"), threads=1)
    report = measure(reference, wrong, load_pairs(bundled_pairs_path())[:40], "sample")
    assert not report["passed"]
    assert report["cosine_min"] < 0.99 and any("lowest cosine" in r for r in report["reasons"])
    honest = load_variant_encoder(other, _export(other, tmp_path / "own"), VariantSpec.parse("onnx-fp32"), threads=1)
    assert measure(reference, honest, load_pairs(bundled_pairs_path())[:40], "sample")["passed"]


def _export(model_dir: Path, folder: Path) -> Path:
    from encoders.export import export_variant

    folder.mkdir()
    export_variant(model_dir, VariantSpec.parse("onnx-fp32"), folder)
    return folder


def test_an_image_model_is_refused_with_a_reason(tmp_path):
    from encoders.errors import ExportError
    from encoders.export import exportable_transformer

    class Fake:
        def __getitem__(self, index):
            return object()

    with pytest.raises(ExportError, match="only text models"):
        exportable_transformer(Fake())  # type: ignore[arg-type]


def test_registry_keeps_variants_beside_the_version_and_detects_tampering(tmp_path, tiny_model_dir, exported):
    import shutil

    from encoders.encoder import describe, load_sentence_transformer
    from registry.errors import IntegrityError, VersionNotFoundError
    from registry.manifest import FidelityReport, Manifest, VariantRecord
    from registry.store import ModelRegistry

    registry = ModelRegistry.embedded(tmp_path / "registry")
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    info = registry.register("tiny", tiny_model_dir, manifest)
    with pytest.raises(VersionNotFoundError, match="duet models optimize tiny/1 --backend onnx --int8"):
        registry.get_variant(info, "onnx-int8")
    staged = tmp_path / "staged"
    shutil.copytree(exported["onnx-int8"], staged)
    fidelity = FidelityReport(
        passed=True, cosine_min=0.999, cosine_mean=0.9995, spearman_fp32=80, spearman=79.9, spearman_drop=0.1,
        min_cosine=0.99, max_spearman_drop=0.5, probe_texts=10, pairs=5, source="t",
    )  # fmt: skip
    record = VariantRecord(
        name="onnx-int8",
        backend="onnx",
        precision="int8",
        source_ref="x",
        source_weights_sha256=None,
        fidelity=fidelity,
    )
    saved = registry.save_variant(info, staged, record)
    assert saved.ref == "tiny/1:onnx-int8" and not staged.exists()
    assert saved.record.source_weights_sha256 == info.manifest.lineage.weights_sha256
    assert registry.list_variants(info) == {"onnx-int8": saved.record}
    registry.verify(info)  # the version's own files are untouched
    found = registry.get_variant(info, "onnx-int8", verify=True)
    with (found.path / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(IntegrityError, match="modified after it was saved"):
        registry.get_variant(info, "onnx-int8", verify=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onnx-int8", "openvino-int8"])
def test_real_minilm_variant_passes_the_gate(name, tmp_path, minilm_path):
    """all-MiniLM-L6-v2 exported and quantised, gated on the shipped STS-B dev captions (minutes on 2 cores)."""
    from encoders.encoder import Encoder
    from encoders.export import export_variant
    from encoders.fidelity import bundled_pairs_path, load_pairs, measure
    from encoders.runtime import load_variant_encoder

    spec = VariantSpec.parse(name)
    export_variant(minilm_path, spec, tmp_path)
    reference = Encoder.load(minilm_path, device="cpu", packing="off")
    variant = load_variant_encoder(minilm_path, tmp_path, spec, threads=2)
    report = measure(reference, variant, load_pairs(bundled_pairs_path()), "captions")
    assert report["passed"], report
