"""What clients get for the batcher's, the image memory budget's and the dataset uploads' errors,
pinned byte for byte (status, code, message, param, headers) through the real exception handlers,
so moving their mapping into service/errors.py's one table changes nothing a client sees."""

from __future__ import annotations

import asyncio
import base64
import io
import zipfile
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.batching import Batcher, BatchLimits
from service.embedding import admitted, embed_prepared
from service.errors import install_error_handlers
from service.inputs import prepare
from service.limits import memory_budget
from service.metrics import Metrics
from service.settings import Settings
from tests.helpers import make_settings

BIG = 1024 * 1024 * 3  # one 1024 x 1024 RGB image, decoded
REDUCED = 64 * 64 * 3  # what each keeps once reduced to the model's 64 px
BUDGET = BIG + 30_000  # two such images fit (one full-size decode at a time), three never do


def _encode(payloads, modality):
    return np.ones((len(payloads), 3), dtype=np.float32)


def _model(started: bool) -> SimpleNamespace:
    batcher = Batcher(name="tiny/1", encode=_encode, limits=BatchLimits(max_queue_items=2), metrics=Metrics())
    if started:
        batcher.start()
    return SimpleNamespace(
        ref="tiny/1",
        batcher=batcher,
        info=SimpleNamespace(manifest=SimpleNamespace(contract=SimpleNamespace(dimension=3))),
    )


def _png_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class _Encoder:
    contract = SimpleNamespace(image_size=64)

    def count_tokens(self, texts):
        return [(len(t.split()), False) for t in texts]


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Iterator[TestClient]:
    """Only the exception handlers and routes that raise what the service's embedding path raises."""
    app = FastAPI()
    install_error_handlers(app)
    images = Settings(data_dir=tmp_path_factory.mktemp("images"), max_image_memory_bytes=BUDGET)

    @app.post("/admit")
    async def admit(started: bool = True) -> dict:
        model = _model(started)
        try:
            with admitted(model, 5):  # more than the queue's 2
                return {}
        finally:
            model.batcher.stop()

    @app.post("/embed")
    async def embed(started: bool = True) -> dict:
        model = _model(started)
        try:
            prepared = await prepare([("text", "a b c")] * 3, _Encoder(), images)
            await embed_prepared(model, prepared)
            return {}
        finally:
            model.batcher.stop()

    @app.post("/images")
    async def decode(count: int, held: int = 0) -> dict:
        budget = memory_budget(images.max_image_memory_bytes)
        assert budget.reserve(held)
        try:
            prepared = await prepare([("image", _png_uri(1024, 1024))] * count, _Encoder(), images)
            prepared.release()
            return {}
        finally:
            budget.release(held)

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def answer(response) -> tuple[int, dict, str | None]:
    return response.status_code, response.json()["error"], response.headers.get("retry-after")


def test_a_full_queue_is_429_naming_the_model_with_retry_after(mini):
    error = {
        "message": "tiny/1 is at capacity (queue full: 0 inputs pending, limit 2); retry after 1s",
        "type": "rate_limit_error",
        "code": "queue_full",
        "param": None,
    }
    assert answer(mini.post("/admit")) == (429, error, "1")
    error["message"] = "tiny/1 is at capacity (queue full: 0 inputs pending, limit 2); retry after 1s"
    assert answer(mini.post("/embed")) == (429, error, "1")  # admitted by embed itself: 3 inputs


@pytest.mark.parametrize("path", ["/admit", "/embed"])
def test_a_stopped_worker_is_503_worker_dead(mini, path):
    error = {
        "message": "the batch worker for tiny/1 is not running; the service needs a restart (see /health)",
        "type": "server_error",
        "code": "worker_dead",
        "param": None,
    }
    assert answer(mini.post(path, params={"started": False})) == (503, error, None)


def test_images_that_could_never_fit_the_budget_are_413(mini):
    status, error, retry_after = answer(mini.post("/images", params={"count": 3}))
    assert (status, error["code"], error["param"], error["type"], retry_after) == (
        413,
        "images_too_large",
        "input",
        "invalid_request_error",
        None,
    )
    need = BIG + 3 * REDUCED  # one full-size decode at a time, beside the reduced copies
    assert error["message"] == (
        f"the images of this request need {need} bytes of memory once decoded; the server allows "
        f"{BUDGET} (DUET_MAX_IMAGE_MEMORY_BYTES): send fewer or smaller images per request"
    )


def test_a_momentarily_full_image_budget_is_429_with_retry_after(mini):
    need = BIG + REDUCED
    status, error, retry_after = answer(mini.post("/images", params={"count": 1, "held": 20_000}))
    assert (status, error, retry_after) == (
        429,
        {
            "message": f"the server is decoding other images and has no room for this request's {need} bytes "
            "now; retry",
            "type": "rate_limit_error",
            "code": "image_memory_full",
            "param": None,
        },
        "1",
    )


# -- dataset uploads ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[TestClient]:
    from service.app import create_app

    settings = make_settings(
        tmp_path_factory.mktemp("uploads") / "data",
        preload_models=[],
        register_default_models=False,
        local_worker=False,
        max_dataset_bytes=1000,
        max_dataset_files=3,
        dataset_storage_per_key_bytes=1500,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def upload(api: TestClient, filename: str, content: bytes) -> tuple[int, dict, str | None]:
    response = api.post("/v1/datasets", params={"filename": filename}, content=content)
    return response.status_code, response.json().get("error", {}), response.headers.get("retry-after")


def zipped(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _error(message: str, code: str, param: str | None = None) -> dict:
    return {"message": message, "type": "invalid_request_error", "code": code, "param": param}


def test_a_bad_dataset_filename_is_400_naming_the_filename_param(api):
    assert upload(api, "../x.csv", b"a") == (
        400,
        _error(
            "filename '../x.csv' is not allowed: use letters, digits, '.', '_' and '-' (at most 128 characters), "
            "no folders",
            "invalid_dataset_name",
            "filename",
        ),
        None,
    )
    assert upload(api, "x.exe", b"a")[:2] == (
        400,
        _error(
            "filename 'x.exe' must end with one of .jsonl, .json, .csv, .tsv, .parquet, .zip, .txt",
            "invalid_dataset_name",
            "filename",
        ),
    )


def test_dataset_size_and_count_limits_are_413_with_their_own_codes(api):
    assert upload(api, "big.csv", b"x" * 1001) == (
        413,
        _error("dataset is larger than 1000 bytes (DUET_MAX_DATASET_BYTES)", "dataset_too_large"),
        None,
    )
    many = zipped([(f"{i}.txt", b"") for i in range(4)])
    assert upload(api, "many.zip", many)[:2] == (
        413,
        _error("the archive has 4 entries, more than the 3 allowed (DUET_MAX_DATASET_FILES)", "dataset_too_many_files"),
    )
    assert upload(api, "first.txt", b"x" * 900)[0] == 201
    assert upload(api, "second.txt", b"y" * 900)[:2] == (
        413,
        _error(
            "storage for datasets is full: uploads (auth is off: one allowance for all) may use 1500 bytes "
            "(DUET_DATASET_STORAGE_PER_KEY_BYTES), 600 are left and this upload needs 900",
            "dataset_storage_full",
        ),
    )


def test_an_empty_or_unreadable_dataset_is_400(api):
    assert upload(api, "empty.csv", b"") == (
        400,
        _error("the upload is empty; send the file as the request body", "empty_dataset"),
        None,
    )
    status, error, _ = upload(api, "bad.zip", b"not a zip")
    assert (status, error["code"], error["param"]) == (400, "invalid_dataset", None)
    assert error["message"] == "the upload ends with .zip but is not a readable zip archive: File is not a zip file"


def test_the_embed_path_still_answers_per_input_errors_with_their_param():
    """ItemError keeps its own mapping in service/embedding.py: only it knows which input failed."""
    from service.errors import ApiError

    class Failing:
        async def embed(self, payloads, modality, costs, admission=None):
            from service.batching import ItemError

            raise ItemError(1, ValueError("boom"))

    model = SimpleNamespace(ref="tiny/1", batcher=Failing(), info=_model(False).info)

    async def main():
        prepared = await prepare([("text", "a"), ("text", "b")], _Encoder(), Settings())
        await embed_prepared(model, prepared)

    with pytest.raises(ApiError) as raised:
        asyncio.run(main())
    assert (raised.value.status, raised.value.code, raised.value.param) == (422, "internal_error", "input[1]")
    assert raised.value.message == "input[1] could not be embedded: boom"


def test_every_row_of_the_table_is_answered_by_the_table_handler():
    """A class added to `_DOMAIN_ERRORS` without a handler along its MRO would be a bare 500."""
    from service.errors import _DOMAIN_ERRORS

    app = FastAPI()
    install_error_handlers(app)
    for mapping in _DOMAIN_ERRORS:
        handler = next(app.exception_handlers[cls] for cls in mapping.cls.__mro__ if cls in app.exception_handlers)
        assert handler.__name__ == "_domain_error", mapping.cls
