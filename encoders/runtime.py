"""Run a variant: the exported transformer in ONNX Runtime or OpenVINO, inside the version's own
sentence-transformers pipeline (its tokenizer before, its pooling and normalisation after).

`RuntimeForward` replaces only the Transformer module's forward pass; `load_variant_encoder`
builds an `Encoder` around it, so the service batches, counts tokens and checks contracts exactly
as for a torch model. The torch weights of the transformer are dropped once the runtime holds
the graph (moved to the meta device), so a variant costs the runtime's memory, not both.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from encoders.errors import ModelLoadError
from encoders.export import INPUT_NAMES, model_file
from encoders.variants import VariantSpec, require_runtime

if TYPE_CHECKING:
    from encoders.contract import VectorContract
    from encoders.encoder import Encoder


class RuntimeForward:
    """The transformer's forward pass in a runtime: tokenizer features in, token embeddings out.

    Safe to call from several threads at once (the batcher's workers): ONNX Runtime sessions
    are, and OpenVINO gets one infer request per thread.
    """

    def __init__(self, spec: VariantSpec, path: Path, threads: int) -> None:
        self.spec = spec
        self.path = path
        self.threads = max(1, threads)
        self._local = threading.local()
        if spec.backend == "onnx":
            self._session = self._onnx_session()
            self.inputs = [i.name for i in self._session.get_inputs()]
        else:
            self._compiled = self._openvino_model()
            self.inputs = [port.get_any_name() for port in self._compiled.inputs]

    def _onnx_session(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _openvino_model(self) -> Any:
        import openvino as ov

        config = {
            # fp32 means fp32: OpenVINO's CPU default on bf16-capable CPUs is bf16 arithmetic.
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": str(self.threads),
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
        }
        return ov.Core().compile_model(str(self.path), "CPU", config)

    def __call__(self, features: dict[str, Any]) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(features[name].numpy(), dtype=np.int64) for name in self.inputs}
        if self.spec.backend == "onnx":
            hidden = self._session.run(None, feeds)[0]
        else:
            request = getattr(self._local, "request", None)
            if request is None:
                request = self._local.request = self._compiled.create_infer_request()
            request.infer(feeds)
            hidden = request.get_output_tensor(0).data.copy()
        return torch.from_numpy(hidden)

    def memory_bytes(self) -> int:
        """The runtime's weights on disk, the memory it maps (the .bin beside OpenVINO's .xml)."""
        return sum(p.stat().st_size for p in self.path.parent.iterdir() if p.is_file())


def load_variant_encoder(
    base_dir: Path,
    variant_dir: Path,
    spec: VariantSpec,
    *,
    threads: int = 1,
    contract: VectorContract | None = None,
) -> Encoder:
    """An `Encoder` for the version at `base_dir` whose transformer runs from `variant_dir`."""
    from encoders.encoder import Encoder, describe, load_sentence_transformer

    require_runtime(spec)
    path = Path(variant_dir) / model_file(spec)
    if not path.is_file():
        raise ModelLoadError(f"variant {spec.name} has no {path.name} in {variant_dir}")
    model = load_sentence_transformer(base_dir, device="cpu")
    model.eval()
    derived = describe(model, contract.matryoshka_dims if contract else ())
    if contract is not None and not contract.is_compatible_with(derived):
        raise ModelLoadError(f"model at {base_dir!s} no longer matches its manifest's vector contract")
    runtime = RuntimeForward(spec, path, threads)
    unknown = set(runtime.inputs) - set(INPUT_NAMES)
    if unknown:
        raise ModelLoadError(f"variant {spec.name} expects inputs {sorted(unknown)} that the tokenizer does not give")
    model[0].auto_model.to("meta")  # the runtime holds the weights now
    return Encoder(model, contract or derived, "cpu", None, runtime=runtime)
