"""`duet models optimize REF --backend onnx|openvino [--int8]`: derive a variant and gate it.

Exports the version's transformer (encoders/export.py), measures the variant against the version
in torch fp32 on the fidelity pairs (encoders/fidelity.py), and keeps it beside the version with
its record (registry/store.py), refused or not: a refused variant's numbers stay visible in
`GET /v1/models/{ref}:{variant}`, and the service will not serve it. Exit code 1 when refused.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

Backend = Annotated[str, typer.Option(help="Inference runtime: onnx (ONNX Runtime) or openvino.")]
Int8 = Annotated[bool, typer.Option("--int8", help="Quantise to int8 (default: fp32).")]
EvalFile = Annotated[
    Path | None,
    typer.Option(
        "--eval",
        exists=True,
        dir_okay=False,
        help="Fidelity pairs: 'score<TAB>text<TAB>text' or the STS benchmark's csv "
        "(default: the STS-B dev captions shipped with Duet).",
    ),
]
CalibrationFile = Annotated[
    Path | None,
    typer.Option(
        exists=True, dir_okay=False, help="Texts, one a line, to calibrate OpenVINO int8 on (default: shipped)."
    ),
]


def optimize(
    ref: Annotated[str, typer.Argument(help="The version to optimise: name, name@alias or name/version.")],
    backend: Backend = "onnx",
    int8: Int8 = False,
    eval_file: EvalFile = None,
    calibration: CalibrationFile = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="State folder (default: $DUET_DATA_DIR or ./duet-data).")
    ] = None,
) -> None:
    """Derive an ONNX Runtime or OpenVINO variant of a version, gate it against fp32, keep it beside the version."""
    from duet.cli import _fail, _registry, _user_errors
    from encoders.errors import RuntimeMissingError, VariantSpecError
    from encoders.fidelity import bundled_pairs_path, load_pairs
    from encoders.variants import VariantSpec, require_runtime

    try:
        spec = VariantSpec.parse(f"{backend}-{'int8' if int8 else 'fp32'}")
        require_runtime(spec, quantizing=True)
    except (VariantSpecError, RuntimeMissingError) as exc:
        raise _fail(str(exc), code=2) from None
    try:
        pairs = load_pairs(eval_file or bundled_pairs_path())
    except ValueError as exc:
        raise _fail(str(exc), code=2) from None
    texts = None
    if calibration is not None:
        texts = [line.strip() for line in calibration.read_text().splitlines() if line.strip()]
    with _user_errors():
        registry = _registry(data_dir)
        info = registry.resolve(ref)
        registry.verify(info)
        variant = _derive(registry, info, spec, pairs, str(eval_file or "shipped STS-B dev captions"), texts)
    _report(variant)
    if not variant.record.fidelity.passed:
        raise typer.Exit(1)


class _Stages:
    """The progress display: one line per stage with its time, and a counter while the gate embeds."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stage_started = self.started

    def stage(self, text: str) -> None:
        now = time.perf_counter()
        typer.echo(f"[{now - self.started:6.1f}s] {text}", err=True)
        self.stage_started = now

    def embedding(self, label: str, done: int, total: int) -> None:
        end = "\n" if done >= total else "\r"
        typer.echo(f"          gate: {label:8} {done:5}/{total} texts", err=True, nl=False)
        typer.echo(end, err=True, nl=False)


def _derive(registry, info, spec, pairs, source, calibration_texts):
    """Export into a staging folder beside the variants, gate, then save (refused or not)."""
    import shutil

    from encoders.encoder import Encoder
    from encoders.export import export_variant
    from encoders.fidelity import measure
    from encoders.provenance import library_versions
    from encoders.runtime import load_variant_encoder
    from registry.manifest import FidelityReport, VariantRecord
    from service.model_pool.cpu_policy import usable_cores

    stages = _Stages()
    stages.stage(f"optimising {info.ref} to {spec.name}")
    staged = registry.variants_dir / f".staging-{uuid.uuid4().hex}"
    staged.mkdir(parents=True)
    try:
        details = export_variant(info.path, spec, staged, calibration_texts, progress=stages.stage)
        stages.stage(f"fidelity gate on {len(pairs)} pairs ({source})")
        reference = Encoder.load(info.path, device="cpu", dtype="float32", packing="off")
        candidate = load_variant_encoder(
            info.path, staged, spec, threads=usable_cores(), contract=info.manifest.contract
        )
        report = measure(reference, candidate, pairs, source, progress=stages.embedding)
        record = VariantRecord(
            name=spec.name,
            backend=spec.backend,
            precision=spec.precision,
            source_ref=info.ref,
            source_weights_sha256=info.manifest.lineage.weights_sha256,
            export=details,
            fidelity=FidelityReport(**report),
            library_versions=library_versions(),
        )
        return registry.save_variant(info, staged, record)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _report(variant) -> None:
    f = variant.record.fidelity
    typer.echo(
        f"{variant.ref}: cosine to fp32 min {f.cosine_min:.4f} mean {f.cosine_mean:.4f}; "
        f"STS Spearman {f.spearman:.2f} vs fp32 {f.spearman_fp32:.2f} (drop {f.spearman_drop:+.2f}) "
        f"on {f.pairs} pairs"
    )
    if f.passed:
        typer.echo(f'gate passed: request it as "{variant.ref}" (or "{variant.version.name}:{variant.record.name}")')
    else:
        typer.secho(f"gate refused: {'; '.join(f.reasons)}; it will not be served", fg=typer.colors.RED, err=True)
