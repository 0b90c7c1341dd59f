"""Optimised variants of a model version: which inference runtime, at which precision.

A variant is derived from one registered version (never a version of its own): the same
tokenizer, pooling and normalisation, with the transformer's forward pass run by ONNX Runtime or
OpenVINO, in fp32 or int8. It is named `<backend>-<precision>` (`onnx-int8`), and a request names
it after the version reference: `minilm/1:onnx-int8`, `minilm:openvino-int8` (the variant of
whatever `minilm`'s production alias serves).

Why a ':' suffix rather than an alias: aliases point at versions (MLflow's rule, and the alias
watcher's contract checks rely on it); a variant is a way of running a version, so it rides on
any reference to one. ':' is outside the name and alias grammar, so no existing reference
changes meaning.

The runtimes are optional (the `optimize` extra): this module imports none of them, and
`require_runtime` says which extra to install when one is missing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, get_args

from encoders.errors import RuntimeMissingError, VariantSpecError

Backend = Literal["onnx", "openvino"]
Precision = Literal["fp32", "int8"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
SEPARATOR = ":"
INSTALL_HINT = "pip install 'duet[optimize]'"

# The Python modules each backend needs, at export and at serving time.
_RUNTIME_MODULES: dict[Backend, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime"),
    "openvino": ("onnx", "openvino"),
}
_QUANTIZER_MODULES: dict[Backend, tuple[str, ...]] = {"onnx": (), "openvino": ("nncf",)}


@dataclass(frozen=True)
class VariantSpec:
    """Backend and precision: together they name a variant."""

    backend: Backend
    precision: Precision

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        backend, _, precision = text.strip().partition("-")
        if backend not in BACKENDS or precision not in PRECISIONS:
            choices = ", ".join(f"{b}-{p}" for b in BACKENDS for p in PRECISIONS)
            raise VariantSpecError(f"unknown variant {text!r}: use one of {choices}")
        return cls(backend, precision)


def split_variant(ref: str) -> tuple[str, VariantSpec | None]:
    """`minilm/1:onnx-int8` -> (`minilm/1`, onnx-int8); a reference without ':' is returned as is."""
    if SEPARATOR not in ref:
        return ref, None
    base, _, variant = ref.rpartition(SEPARATOR)
    return base, VariantSpec.parse(variant)


def missing_modules(spec: VariantSpec, *, quantizing: bool = False) -> list[str]:
    """The modules this variant needs that are not installed (nothing is imported to find out)."""
    needed = _RUNTIME_MODULES[spec.backend]
    if quantizing and spec.precision == "int8":
        needed = needed + _QUANTIZER_MODULES[spec.backend]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def require_runtime(spec: VariantSpec, *, quantizing: bool = False) -> None:
    """Raise `RuntimeMissingError` naming the extra to install when the backend is missing."""
    missing = missing_modules(spec, quantizing=quantizing)
    if missing:
        raise RuntimeMissingError(
            f"the {spec.name} variant needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )
