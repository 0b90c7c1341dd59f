"""Errors raised by the model library; the service maps them to HTTP in one place."""

from __future__ import annotations


class EncoderError(Exception):
    """Base class for problems with an encoder or its inputs."""


class UnsupportedModalityError(EncoderError):
    """An input of a modality the model has no tower for (an image sent to a text-only model)."""


class ImageDecodeError(EncoderError):
    """Bytes that do not decode to a usable image: corrupt, not an image, or too large."""


class ModelLoadError(EncoderError):
    """A model folder or hub id that does not load as a sentence-transformers model."""


class VariantSpecError(EncoderError, ValueError):
    """A variant name that is not `<backend>-<precision>` (`onnx-int8`)."""


class RuntimeMissingError(EncoderError):
    """The optional inference runtime a variant needs (ONNX Runtime, OpenVINO) is not installed."""


class ExportError(EncoderError):
    """A model that cannot be exported to a runtime (no Hugging Face transformer, an image tower)."""
