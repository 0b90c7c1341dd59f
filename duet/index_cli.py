"""`duet index ...`: bulk import, export and stats of collections, through the HTTP API.

Going through the running service (not the files under the data dir) keeps one writer per
collection and lets the service embed texts and images with the collection's pinned model.
Imports stream the file in batches, so a file of millions of rows never sits in memory.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.tables import CONTENT_KEYS, RowError, count_rows, read_rows

index_app = typer.Typer(help="Import, export and inspect collections (through the running service).")

Url = Annotated[str, typer.Option(envvar="DUET_URL", help="The service's base URL.")]


def _image_uri(value: str, base: Path) -> str:
    if value.startswith("data:image/"):
        return value
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise RowError(f"image file not found: {path}")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def to_item(row: dict[str, Any], line: int, base: Path, source: str, content: str | None = None) -> dict[str, Any]:
    """One file row -> one API item. Non-content fields become the payload.

    `content` names the column to embed when a row has several (e.g. a caption and its
    image): the others are kept in the payload.
    """
    row = {k: v for k, v in row.items() if v is not None and v != ""}
    present = [k for k in CONTENT_KEYS if k in row]
    if content is not None:
        if content not in row:
            raise RowError(f"{source}:{line}: no '{content}' column to embed")
        present = [content]
    if len(present) != 1:
        raise RowError(
            f"{source}:{line}: needs exactly one of text, image, vector (got {present or 'none'}); "
            "pick one with --content"
        )
    key = present[0]
    item: dict[str, Any] = {"id": str(row.pop("id", f"{Path(source).stem}-{line}"))}
    value = row.pop(key)
    if key == "vector" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{source}:{line}: vector is not a JSON list of numbers") from None
    if key == "image":
        try:
            value = _image_uri(str(value), base)
        except RowError as exc:
            raise RowError(f"{source}:{line}: {exc}") from None
    item[key] = value
    payload = row.pop("payload", None)
    if isinstance(payload, str):
        payload = json.loads(payload)
    item["payload"] = {**(payload or {}), **row}
    return item


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _api_error(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    )


@index_app.command("import")
def import_file(
    collection: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, CSV/TSV or Parquet.")],
    url: Url = "http://127.0.0.1:8000",
    batch_size: Annotated[int, typer.Option(min=1, max=2048, help="Items per request.")] = 256,
    skip_bad_rows: Annotated[bool, typer.Option(help="Count and skip rows that cannot become items.")] = False,
    content: Annotated[
        str | None, typer.Option(help="Column to embed (text, image or vector) when rows have several.")
    ] = None,
) -> None:
    """Upsert every row of FILE into COLLECTION: one of text / image (path or data URI) /
    vector per row, optional id, every other field goes to the payload."""
    total = count_rows(file)
    imported = skipped = 0
    batch: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=600) as client, _progress() as progress:
        task = progress.add_task(f"import {file.name}", total=total)

        def flush() -> None:
            nonlocal imported
            response = client.put(f"/v1/collections/{collection}/items", json={"items": batch})
            if response.status_code != 200:
                raise _fail(f"batch ending at row {imported + skipped + len(batch)}: {_api_error(response)}")
            imported += len(batch)
            progress.advance(task, len(batch))
            batch.clear()

        try:
            for line, row in read_rows(file):
                try:
                    batch.append(to_item(row, line, file.parent, str(file), content))
                except (RowError, json.JSONDecodeError) as exc:
                    if not skip_bad_rows:
                        raise _fail(str(exc)) from None
                    skipped += 1
                    progress.advance(task)
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        except RowError as exc:
            raise _fail(str(exc)) from None
        except httpx.TransportError as exc:
            raise _fail(f"cannot reach {url}: {exc} (is `duet serve` running? set --url)") from None
    typer.echo(f"imported {imported} items into {collection}" + (f", skipped {skipped} bad rows" if skipped else ""))


@index_app.command("export")
def export(
    collection: str,
    file: Annotated[Path, typer.Argument(dir_okay=False, help="JSONL file to write.")],
    url: Url = "http://127.0.0.1:8000",
    with_vectors: Annotated[bool, typer.Option(help="Include each item's vector.")] = False,
) -> None:
    """Write every item of COLLECTION to a JSONL file that `duet index import` reads back."""
    tmp = file.with_suffix(file.suffix + ".partial")
    written = 0
    with httpx.Client(base_url=url, timeout=600) as client, _progress() as progress, tmp.open("w") as out:
        info = client.get(f"/v1/collections/{collection}")
        if info.status_code != 200:
            raise _fail(_api_error(info))
        task = progress.add_task(f"export {collection}", total=info.json()["count"])
        cursor = None
        while True:
            params = {"limit": 1000, "with_vector": with_vectors, **({"cursor": cursor} if cursor else {})}
            page = client.get(f"/v1/collections/{collection}/items", params=params)
            if page.status_code != 200:
                raise _fail(_api_error(page))
            body = page.json()
            for item in body["items"]:
                row: dict[str, Any] = {"id": item["id"], "payload": item["payload"]}
                if item["modality"] in ("text", "image") and item["content"] is not None:
                    row[item["modality"]] = item["content"]
                if with_vectors or "text" not in row and "image" not in row:
                    row["vector"] = item["vector"]
                out.write(json.dumps(row) + "\n")
            written += len(body["items"])
            progress.advance(task, len(body["items"]))
            cursor = body["next_cursor"]
            if cursor is None:
                break
    os.replace(tmp, file)
    typer.echo(f"exported {written} items to {file}")


@index_app.command("stats")
def stats(collection: str, url: Url = "http://127.0.0.1:8000") -> None:
    """Count, index kind, payload fields and modality gap of COLLECTION."""
    try:
        response = httpx.get(f"{url}/v1/collections/{collection}", timeout=60)
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise _fail(_api_error(response))
    typer.echo(json.dumps(response.json(), indent=2))
