"""`duet keys`: make API keys. The service stores only their salted hashes.

`duet keys create NAME --scopes embed,search` prints the new key once (it is not kept
anywhere) and the entry to add to the file `DUET_API_KEYS_FILE` names; the service reads
the file at start-up. Lose a key: create another and delete the old entry.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated

import typer

keys_app = typer.Typer(help="Create API keys (auth is on once any key is configured).", no_args_is_help=True)

SCOPES = ("embed", "search", "write", "train", "admin")  # service/auth/keys.py SCOPES (kept import-light here)
KEY_PREFIX = "duet_"


def new_key() -> str:
    """32 random bytes: too many to guess, so one sha256 round (with a salt) stores it safely."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, scopes: list[str], salt: str | None = None) -> dict[str, object]:
    import hashlib

    salt = salt if salt is not None else secrets.token_hex(16)
    return {
        "name": name,
        "key_sha256": hashlib.sha256(salt.encode() + key.encode()).hexdigest(),
        "salt": salt,
        "scopes": scopes,
    }


def parse_scopes(raw: str) -> list[str]:
    scopes = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise typer.BadParameter(f"unknown scopes {unknown}; choose from {', '.join(SCOPES)}")
    return scopes


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key (its owner or use); unique in the file.")],
    scopes: Annotated[
        str, typer.Option(help=f"Comma-separated: {', '.join(SCOPES)} (admin implies all); '' for /metrics only.")
    ] = "embed,search",
    rate_limit_per_second: Annotated[float | None, typer.Option(help="This key's requests per second.")] = None,
    concurrency_limit: Annotated[int | None, typer.Option(help="This key's requests in flight at once.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entry as JSON (for DUET_API_KEYS).")] = False,
) -> None:
    """Print a new key and the entry to add to DUET_API_KEYS_FILE (YAML list, or JSON with --json)."""
    chosen = parse_scopes(scopes)
    key = new_key()
    entry = key_entry(name, key, chosen)
    if rate_limit_per_second is not None:
        entry["rate_limit_per_second"] = rate_limit_per_second
    if concurrency_limit is not None:
        entry["concurrency_limit"] = concurrency_limit
    typer.echo(f"key (shown once; give it to the client as 'Authorization: Bearer <key>'):\n{key}\n", err=True)
    typer.echo("entry for DUET_API_KEYS_FILE:" if not as_json else "entry for DUET_API_KEYS (a JSON list):", err=True)
    if as_json:
        typer.echo(json.dumps(entry))
        return
    lines = [f"- name: {json.dumps(name)}"]
    lines += [f"  {field}: {json.dumps(value)}" for field, value in entry.items() if field != "name"]
    typer.echo("\n".join(lines))
