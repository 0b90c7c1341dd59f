"""`duet index import/export/stats` against a running server, on each collections backend (they go through
the HTTP API, so they must work whichever store holds the collection)."""

from __future__ import annotations

import base64
import io
import json
import uuid

from PIL import Image
from typer.testing import CliRunner

from duet.cli import app

runner = CliRunner()


def _collection(http, **body) -> str:
    name = "cli" + uuid.uuid4().hex[:8]
    assert http.post("/v1/collections", json={"name": name, **body}).status_code == 201
    return name


def test_import_csv_then_export_round_trips(backend_http, backend_server, tmp_path):
    name = _collection(backend_http, model="minilm")
    source = tmp_path / "docs.csv"
    source.write_text(
        "id,text,year,lang\na,A man plays guitar.,2020,en\nb,Onions are sliced.,2021,en\nc,Ein Hund.,2019,de\n"
    )
    result = runner.invoke(
        app, ["index", "import", name, str(source), "--url", backend_server.url, "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "imported 3 items" in result.output
    item = backend_http.get(f"/v1/collections/{name}/items/a").json()
    assert item["payload"] == {"year": 2020, "lang": "en"}  # CSV numbers become numbers
    out = tmp_path / "out.jsonl"
    exported = runner.invoke(app, ["index", "export", name, str(out), "--url", backend_server.url])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[2]["text"] == "Ein Hund."
    stats = runner.invoke(app, ["index", "stats", name, "--url", backend_server.url])
    assert json.loads(stats.output)["count"] == 3


def test_import_jsonl_with_image_paths_and_vectors(backend_http, backend_server, tmp_path):
    name = _collection(backend_http, model="minilm-dual")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, "PNG")
    (tmp_path / "red.png").write_bytes(buffer.getvalue())
    rows = [{"id": "img", "image": "red.png", "colour": "red"}, {"id": "cap", "text": "a red square"}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = runner.invoke(app, ["index", "import", name, str(tmp_path / "items.jsonl"), "--url", backend_server.url])
    assert result.exit_code == 0, result.output
    item = backend_http.get(f"/v1/collections/{name}/items/img").json()
    assert item["modality"] == "image" and item["payload"] == {"colour": "red"}
    assert base64.b64decode(item["content"].split(",", 1)[1]) == buffer.getvalue()


def test_bad_rows_stop_the_import_with_file_and_line_or_are_skipped(backend_http, backend_server, tmp_path):
    name = _collection(backend_http, dimension=2)
    source = tmp_path / "vectors.jsonl"
    source.write_text('{"id": "a", "vector": [1, 0]}\n{"id": "b"}\n{"id": "c", "vector": [0, 1]}\n')
    failed = runner.invoke(app, ["index", "import", name, str(source), "--url", backend_server.url])
    assert failed.exit_code == 1 and "vectors.jsonl:2" in failed.output
    skipped = runner.invoke(app, ["index", "import", name, str(source), "--url", backend_server.url, "--skip-bad-rows"])
    assert skipped.exit_code == 0 and "skipped 1 bad rows" in skipped.output
    assert backend_http.get(f"/v1/collections/{name}").json()["count"] == 2
    wrong_dim = tmp_path / "wrong.jsonl"
    wrong_dim.write_text('{"id": "x", "vector": [1, 2, 3]}\n')
    refused = runner.invoke(app, ["index", "import", name, str(wrong_dim), "--url", backend_server.url])
    assert refused.exit_code == 1 and "2 dimensions" in refused.output


def test_unreachable_server_is_a_clear_error(tmp_path):
    source = tmp_path / "x.jsonl"
    source.write_text('{"text": "hi"}\n')
    result = runner.invoke(app, ["index", "import", "c", str(source), "--url", "backend_http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_rows_with_caption_and_image_pick_the_column_to_embed(backend_http, backend_server, tmp_path):
    name = _collection(backend_http, model="minilm-dual")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "b", "image": "blue.png", "text": "a blue square"}) + "\n")
    ambiguous = runner.invoke(
        app, ["index", "import", name, str(tmp_path / "pairs.jsonl"), "--url", backend_server.url]
    )
    assert ambiguous.exit_code == 1 and "--content" in ambiguous.output
    chosen = runner.invoke(
        app, ["index", "import", name, str(tmp_path / "pairs.jsonl"), "--url", backend_server.url, "--content", "image"]
    )
    assert chosen.exit_code == 0, chosen.output
    item = backend_http.get(f"/v1/collections/{name}/items/b").json()
    assert item["modality"] == "image" and item["payload"] == {"text": "a blue square"}
