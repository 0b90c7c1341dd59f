"""Export a model version's transformer to ONNX Runtime or OpenVINO, in fp32 or int8.

Only the transformer's forward pass leaves torch: tokenisation, pooling and normalisation stay
the sentence-transformers modules the version already has (`encoders.runtime` runs them around
the exported graph), so a variant cannot drift from its version in anything but the arithmetic.

Why not sentence-transformers' `backend="onnx"` with optimum: optimum-onnx and optimum-intel pin
transformers below 4.58 and 5.6, under the transformers Duet runs; the runtimes themselves do not.
So the export is torch's own ONNX exporter, then
- onnx fp32: ONNX Runtime's transformer optimiser (attention, LayerNorm and GELU fusions);
- onnx int8: ONNX Runtime's dynamic quantisation of that graph (int8 weights per channel,
  activations quantised per batch at run time: no calibration needed);
- openvino fp32: OpenVINO's converter on the exported ONNX graph;
- openvino int8: NNCF's static post-training quantisation (the transformer preset), calibrated on
  a text sample (`encoders/fidelity_data/calibration.txt` unless the caller passes its own).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoders.errors import ExportError
from encoders.variants import VariantSpec, require_runtime

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPENVINO_FILE = "openvino_model.xml"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
Progress = Callable[[str], None]


def model_file(spec: VariantSpec) -> str:
    """The file a variant's runtime opens (OpenVINO's .xml has its .bin beside it)."""
    return ONNX_FILE if spec.backend == "onnx" else OPENVINO_FILE


def bundled_calibration_texts() -> list[str]:
    path = Path(__file__).parent / "fidelity_data" / "calibration.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def exportable_transformer(model: SentenceTransformer) -> Any:
    """The Hugging Face model inside a text-only sentence-transformer whose first module is its
    Transformer; anything else (an image tower, a Router, a custom first module) is refused."""
    from sentence_transformers.base.modules.transformer import Transformer

    first = model[0]
    if not isinstance(first, Transformer) or "text" not in first.modalities or "image" in first.modalities:
        raise ExportError("only text models whose first module is a Transformer can be exported to a runtime")
    if model.supports("image"):
        raise ExportError("models with an image tower cannot be exported yet (the image route stays on torch)")
    return first.auto_model


def input_names(features: dict[str, Any]) -> list[str]:
    """The tokenizer outputs the transformer takes, in the exported graph's order."""
    return [name for name in INPUT_NAMES if name in features]


class _LastHiddenState:
    """Wraps the Hugging Face model so the exported graph has positional inputs and one output."""

    @staticmethod
    def build(auto_model: Any, names: Sequence[str]) -> torch.nn.Module:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = auto_model

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                return self.inner(**dict(zip(names, tensors, strict=True))).last_hidden_state  # type: ignore[no-any-return]

        return Wrapper().eval()


def export_onnx(model: SentenceTransformer, path: Path) -> list[str]:
    """torch's TorchScript-based ONNX exporter (the dynamo one needs onnxscript); dynamic batch and length."""
    import torch

    auto_model = exportable_transformer(model)
    features = model.preprocess(["An example sentence to trace.", "A second, longer example sentence to trace."])
    names = input_names(features)
    wrapper = _LastHiddenState.build(auto_model, names)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, OUTPUT_NAME]}
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            tuple(features[name] for name in names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return names


def _optimize_onnx(source: Path, target: Path, config: Any) -> None:
    """ONNX Runtime's transformer fusions; an architecture they do not know keeps the plain graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            opt_level=1,
        )
        optimized.save_model_to_file(str(target))
    except Exception as exc:  # the fusions are an optimisation: never a reason to fail the export
        logger.warning("ONNX Runtime's transformer optimiser failed (%s); keeping the unfused graph", exc)
        shutil.copy(source, target)


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# The feed-forward down-projections (`layer.N.output.dense`) stay fp32 in both int8 recipes: their
# inputs are GELU outputs with large outliers, which one scale per tensor clips or flattens. Measured
# on all-MiniLM-L6-v2 (STS-B dev captions): quantising them too left the lowest cosine to fp32 at
# 0.988 (ONNX Runtime) and 0.990 (NNCF), under the gate; without them, 0.9935 with ONNX Runtime.
FFN_DOWN = re.compile(r"/layer\.\d+/output/dense/")


def _fp32_nodes(path: Path) -> list[str]:
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if FFN_DOWN.search(node.name)]


def _quantize_onnx(source: Path, target: Path) -> dict[str, Any]:
    """Dynamic int8. Without VNNI, x86's u8s8 multiply can saturate: reduce_range (7-bit weights) avoids it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not _has_vnni()
    kept = _fp32_nodes(source)
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=reduce_range,
        nodes_to_exclude=kept,
        # the fused graph has contrib ops shape inference does not know; their outputs are float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {
        "method": "onnxruntime dynamic",
        "weights": "int8 per channel",
        "reduce_range": reduce_range,
        "kept_fp32": len(kept),
    }


def _calibration_items(model: SentenceTransformer, names: Sequence[str], texts: Sequence[str]) -> list[dict[str, Any]]:
    items = []
    for start in range(0, len(texts), 8):
        features = model.preprocess(list(texts[start : start + 8]))
        items.append({name: features[name].numpy() for name in names})
    return items


def _openvino(
    model: SentenceTransformer,
    onnx_path: Path,
    names: Sequence[str],
    spec: VariantSpec,
    out: Path,
    texts: Sequence[str],
) -> dict[str, Any]:
    import openvino as ov

    converted = ov.convert_model(str(onnx_path))
    details: dict[str, Any] = {}
    if spec.precision == "int8":
        import nncf

        items = _calibration_items(model, names, texts)
        kept = _fp32_nodes(onnx_path)
        converted = nncf.quantize(
            converted,
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
            ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
        )
        details = {
            "method": "nncf static (transformer preset)",
            "calibration_texts": len(texts),
            "kept_fp32": len(kept),
        }
    ov.save_model(converted, str(out / OPENVINO_FILE), compress_to_fp16=False)
    return details


def export_variant(
    model_dir: Path,
    spec: VariantSpec,
    out: Path,
    calibration_texts: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the variant's runtime files into the empty folder `out`; returns how it was made
    (for the variant's record). Raises `RuntimeMissingError` naming the extra to install."""
    from encoders.encoder import load_sentence_transformer

    require_runtime(spec, quantizing=True)
    say = progress or (lambda _: None)
    say("loading the version")
    model = load_sentence_transformer(model_dir, device="cpu")
    model.eval()
    auto_model = exportable_transformer(model)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / ONNX_FILE
        say("exporting the transformer to ONNX")
        names = export_onnx(model, plain)
        details: dict[str, Any] = {"inputs": names, "opset": OPSET}
        if spec.backend == "onnx":
            say("fusing attention and normalisation (ONNX Runtime optimiser)")
            fused = Path(tmp) / "fused.onnx"
            _optimize_onnx(plain, fused, auto_model.config)
            if spec.precision == "int8":
                say("quantising to int8 (dynamic)")
                details |= _quantize_onnx(fused, out / ONNX_FILE)
            else:
                shutil.copy(fused, out / ONNX_FILE)
        else:
            texts = list(calibration_texts or bundled_calibration_texts())
            say(
                "converting to OpenVINO"
                + (f" and quantising to int8 on {len(texts)} texts" if spec.precision == "int8" else "")
            )
            details |= _openvino(model, plain, names, spec, out, texts)
    return details
