"""What a job config and an upload may ask of the server (issue 11): dataset references stay
inside the datasets folder and errors never show server paths or file contents; the service's
limits on what one job may ask for; uploads that are hostile archives or fill the disk get a
clear 4xx, and listing datasets keeps working. No training runs here (no local worker)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.auth.keys import hash_key
from tests.helpers import make_settings

PAIRS = b'{"anchor": "a", "positive": "b"}\n'
KEYS = [
    {"name": "alice", "key_sha256": hash_key("alice-key"), "scopes": ["train"]},
    {"name": "bob", "key_sha256": hash_key("bob-key"), "scopes": ["train"]},
]


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-key"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("guards")


@pytest.fixture(scope="module")
def client(data_root) -> Iterator[TestClient]:
    from service.app import create_app

    tmp_path = data_root
    settings = make_settings(
        tmp_path / "data",
        preload_models=[],
        register_default_models=False,
        local_worker=False,
        api_keys=KEYS,
        max_dataset_files=20,
        max_dataset_unpacked_bytes=200_000,
        dataset_storage_per_key_bytes=300_000,
    )
    (tmp_path / "secret.csv").write_text("anchor,positive,score\na,b,TOP-SECRET-CONTENT\n")
    with TestClient(create_app(settings)) as test_client:
        test_client.headers.update(bearer("alice"))
        yield test_client


def config(path: str, **overrides) -> dict:
    return {
        "base_model": "org/model",
        "train": [{"path": path, "kind": "graded"}],
        "loss": {"name": "cosent"},
        "output": {"name": "tuned"},
        **overrides,
    }


def submit(client: TestClient, body: dict | str):
    if isinstance(body, str):
        return client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    return client.post("/v1/jobs", json={"config": body})


@pytest.mark.parametrize("reference", ["~/secret.csv", "~systemd-network/secret.csv", "../secret.csv", "/etc/passwd"])
def test_references_outside_the_datasets_folder_are_refused_without_showing_server_paths(client, data_root, reference):
    response = submit(client, config(reference))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("invalid training config: train[0].path: ")
    assert f"{reference}'" in message  # named as given
    assert str(data_root) not in message and "SECRET" not in message


def test_an_absolute_path_is_refused_the_same_whether_or_not_it_exists(client):
    there = submit(client, config("/etc/passwd")).json()["error"]["message"]
    absent = submit(client, config("/etc/no-such-file-here")).json()["error"]["message"]
    assert there.replace("/etc/passwd", "X") == absent.replace("/etc/no-such-file-here", "X")


def test_a_link_out_of_the_datasets_folder_is_refused(client, data_root):
    tmp_path = data_root
    uploaded = client.post("/v1/datasets", params={"filename": "pairs.jsonl"}, content=PAIRS).json()
    folder = tmp_path / "data" / "datasets" / uploaded["id"]
    (folder / "link.csv").symlink_to(tmp_path / "secret.csv")
    response = submit(client, config(f"{uploaded['id']}/link.csv"))
    assert response.status_code == 422 and "outside the uploaded datasets" in response.json()["error"]["message"]
    missing = submit(client, config(f"{uploaded['id']}/none.csv")).json()["error"]["message"]
    assert f"no such file '{uploaded['id']}/none.csv'" in missing and str(tmp_path) not in missing


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("batch_size", 10**12, "batch_size"),
        ("batch_size", 5000, "batch_size: 5000 is more than this service allows (4096, DUET_JOB_MAX_BATCH_SIZE)"),
        ("epochs", 1e12, "epochs"),
        ("epochs", 500, "epochs: 500 is more than this service allows (100, DUET_JOB_MAX_EPOCHS)"),
        ("max_steps", 2**62, "max_steps"),
        ("max_steps", 2_000_000, "DUET_JOB_MAX_STEPS"),
        ("dataloader_workers", 64, "dataloader_workers: 64 is more than this service allows (8"),
        ("max_seq_length", 10**9, "max_seq_length"),
        ("max_seq_length", 10_000, "DUET_JOB_MAX_SEQ_LENGTH"),
    ],
)
def test_job_sizes_are_bounded_with_the_field_and_limit_named(client, field, value, words):
    path = client.post("/v1/datasets", params={"filename": "g.csv"}, content=b"anchor,positive,score\na,b,1\n")
    response = submit(client, config(path.json()["path"], **{field: value}))
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]["message"]


def test_a_config_too_large_to_keep_in_the_record_is_413(client):
    # Every job listing returns the configs of up to 500 jobs: a 10 MB 'name' was stored as it came
    dataset = client.post("/v1/datasets", params={"filename": "big.csv"}, content=b"anchor,positive,score\ng,h,1\n")
    big = config(dataset.json()["path"])
    big["train"][0]["name"] = "x" * (2 * 1024 * 1024)
    response = submit(client, big)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["code"] == "job_config_too_large"
    assert "DUET_JOB_MAX_CONFIG_BYTES" in response.json()["error"]["message"]
    assert all(len(json.dumps(job["config"])) < 10_000 for job in client.get("/v1/jobs").json()["data"])


def test_infinity_is_refused_by_the_api_not_the_worker(client):
    path = client.post("/v1/datasets", params={"filename": "g.csv"}, content=b"anchor,positive,score\na,b,1\n")
    body = json.dumps({"config": config(path.json()["path"])}).replace('"output"', '"epochs": Infinity, "output"')
    response = submit(client, body)
    assert response.status_code == 422 and "epochs" in response.text


def zipped(entries: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "entries",
    [
        [("a", b"1"), ("a/b", b"2")],
        [("a/b", b"2"), ("a", b"1")],
        [(".", b"1")],
        [(".evil.csv.dataset.json", b"not json")],
        [("set.zip", b"overwrite the archive")],
    ],
)
def test_hostile_archives_get_400_and_listing_keeps_working(client, entries):
    response = client.post("/v1/datasets", params={"filename": "set.zip"}, content=zipped(entries))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_dataset"
    assert client.get("/v1/datasets").status_code == 200


def test_archive_and_storage_limits_are_413(client):
    many = zipped([(f"{i}.txt", b"") for i in range(21)])
    response = client.post("/v1/datasets", params={"filename": "many.zip"}, content=many)
    assert response.status_code == 413 and "DUET_MAX_DATASET_FILES" in response.json()["error"]["message"]
    bomb = zipped([("big.csv", b"0" * 250_000)], zipfile.ZIP_DEFLATED)
    response = client.post("/v1/datasets", params={"filename": "bomb.zip"}, content=bomb)
    assert response.status_code == 413 and "DUET_MAX_DATASET_UNPACKED_BYTES" in response.json()["error"]["message"]
    assert client.post("/v1/datasets", params={"filename": "a.txt"}, content=b"x" * 200_000).status_code == 201
    full = client.post("/v1/datasets", params={"filename": "b.txt"}, content=b"y" * 150_000)
    assert full.status_code == 413 and full.json()["error"]["code"] == "dataset_storage_full"
    assert "alice" in full.json()["error"]["message"]
    other = client.post("/v1/datasets", params={"filename": "b.txt"}, content=b"y" * 150_000, headers=bearer("bob"))
    assert other.status_code == 201  # each key has its own allowance


def test_a_key_sees_and_uses_only_its_own_datasets(client):
    mine = client.post("/v1/datasets", params={"filename": "own.csv"}, content=b"anchor,positive,score\nq,r,2\n")
    path = mine.json()["path"]
    assert path in [d["path"] for d in client.get("/v1/datasets").json()["data"]]
    assert path not in [d["path"] for d in client.get("/v1/datasets", headers=bearer("bob")).json()["data"]]
    theirs = client.post("/v1/jobs", json={"config": config(path)}, headers=bearer("bob"))
    absent = client.post("/v1/jobs", json={"config": config(path + "x")}, headers=bearer("bob"))
    assert theirs.status_code == absent.status_code == 422
    assert theirs.json()["error"]["message"].replace(path, "P") == absent.json()["error"]["message"].replace(
        path + "x", "P"
    )  # another key's dataset reads exactly as a missing one
    assert submit(client, config(path)).status_code == 201  # its owner may use it
    again = client.post(
        "/v1/datasets", params={"filename": "own.csv"}, content=b"anchor,positive,score\nq,r,2\n", headers=bearer("bob")
    )
    assert again.json()["path"] == path  # the same bytes uploaded by bob: now bob's too
    assert client.post("/v1/jobs", json={"config": config(path)}, headers=bearer("bob")).status_code == 201


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"after": str(2**63)}, {}),  # past SQLite's INTEGER: OverflowError inside the stream
        ({}, {"Last-Event-ID": str(10**30)}),
        ({}, {"Last-Event-ID": "9" * 5000}),  # int() refuses more than 4300 digits
        ({}, {"Last-Event-ID": b"\xb2"}),  # latin-1 "²": isdigit() but not int(): ValueError, a 500
        ({}, {"Last-Event-ID": "3"}),  # the end event's id: an EventSource reconnecting after the end
        ({"after": "7"}, {}),
    ],
)
def test_event_stream_positions_out_of_range_are_not_a_500(client, params, headers):
    """...nor a stream of keep-alives that never ends: past a finished job's last event, it ends at once."""
    dataset = client.post("/v1/datasets", params={"filename": "ev.csv"}, content=b"anchor,positive,score\ne,f,1\n")
    job = submit(client, config(dataset.json()["path"])).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # no worker here: cancelled at once
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params=params, headers=headers) as response:
        body = response.read().decode()
    assert response.status_code in (200, 400), body
    if response.status_code == 200:
        assert body.startswith("retry:") and "event: end" in body and '"state":"cancelled"' in body
