"""Test helpers: a real server in a thread, settings, images, cosine."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

# Paraphrase pairs for tiny training runs (tests, the jobs fault script).
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("A woman slices onions.", "Vegetables are being cut."),
    ("A dog runs in the park.", "An animal is running outside."),
    ("The chef cooks soup.", "Food is being prepared."),
    ("Kids play football.", "Children are playing a sport."),
    ("A plane takes off.", "An aircraft is leaving the ground."),
    ("It is raining heavily.", "The weather is wet."),
    ("He reads a book.", "A person is reading."),
]


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """(anchor, positive) pairs as the trainer's JSONL rows."""
    path.write_text("\n".join(json.dumps({"anchor": a, "positive": p}) for a, p in pairs))
    return path


def tiny_run_config(workspace: Path, model_dir: Path, settings: dict[str, Any]):
    """A tiny training run's config: `train.jsonl` in `workspace`, evaluated on `dev.jsonl` (set `dev`),
    InfoNCE at batch 8 and lr 1e-3, seed 7; `settings` add to or replace those keys. The training tests
    share it so they differ only in what they are about."""
    from trainer.config import parse_config

    data = {
        "base_model": str(model_dir),
        "train": [{"path": "train.jsonl"}],
        "eval": [{"path": "dev.jsonl", "name": "dev"}],
        "loss": {"name": "infonce"},
        "batch_size": 8,
        "learning_rate": 1e-3,
        "log_every_steps": 1,
        "seed": 7,
        **settings,
    }
    return parse_config(data, workspace)


def register_trained(registry, name: str, folder: Path, claims=(), aliases: tuple[str, ...] = ()):
    """Register `folder` as a trained version of `name`, its contract read from the model itself;
    `claims` are `Compatibility` records for the manifest's `compatible_with`."""
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Manifest

    manifest = Manifest(
        contract=describe(load_sentence_transformer(folder)), trained=True, compatible_with=list(claims)
    )
    return registry.register(name, folder, manifest, aliases=aliases)


def perturbed_copy(model_dir: Path, out: Path, seed: int) -> Path:
    """`model_dir`'s model with noise added to every weight, saved to `out`: the same contract
    (dimension, tokenizer), other vectors."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(seed)
    model = SentenceTransformer(str(model_dir), device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save(str(out))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, settings) -> None:
        import uvicorn

        from service.app import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready in 120 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self):
        return self.app.state.duet


_MIGRATED_DB: list[Path] = []  # this process's empty, migrated MLflow database (made once)
_MIGRATED_DB_LOCK = threading.Lock()


def seed_registry_database(root: Path) -> None:
    """Give a fresh embedded registry root an empty database MLflow has already migrated: the
    migrations take seconds on every new database, and the tests make many. What the registry then
    writes (its experiment, versions, artifacts) happens after the copy, under `root`."""
    import shutil
    import tempfile

    from registry.store import ModelRegistry

    with _MIGRATED_DB_LOCK:
        if not _MIGRATED_DB:
            template = Path(tempfile.mkdtemp(prefix="duet-registry-template-"))
            ModelRegistry.embedded(template)
            _MIGRATED_DB.append(template / "mlflow.db")
    root = Path(root)
    if not (root / "mlflow.db").exists():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MIGRATED_DB[0], root / "mlflow.db")


def embedded_registry(root: Path):
    """`ModelRegistry.embedded(root)`, seeded as above."""
    from registry.store import ModelRegistry

    seed_registry_database(root)
    return ModelRegistry.embedded(root)


def make_settings(data_dir: Path, **overrides):
    from service.settings import Settings

    values = {"data_dir": data_dir, "preload_models": ["minilm"], "alias_refresh_seconds": 0.0}
    values.update(overrides)
    settings = Settings(**values)
    if not settings.registry_uri:
        seed_registry_database(settings.registry_dir)
    return settings


def png_data_uri(width: int = 32, height: int = 32, color=(255, 0, 0), mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.atleast_2d(a)
    b = np.atleast_2d(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


class MilvusLiteServer:
    """`milvus-lite server` (the gRPC server the milvus-lite package ships) on a loopback port, as a child
    process: a real Milvus endpoint for the milvus backend's tests. `stop()`/`start()` simulate an outage."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import shutil

        exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
        self.process = subprocess.Popen(
            [exe, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("milvus-lite server did not listen in 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> MilvusLiteServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
