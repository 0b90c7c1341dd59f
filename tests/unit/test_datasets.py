"""Uploaded datasets against a hostile uploader: archives that clash with themselves or with
our manifests, that claim small sizes and unpack large, with too many entries, or that would
overwrite what is stored; and listing that survives anything found on disk."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from jobs.datasets import DatasetError, DatasetLimits, DatasetStore, DatasetTooLargeError


def make_zip(entries: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(store: DatasetStore, data: bytes, filename: str, owner: str = ""):
    temp, digest = store.begin()
    temp.write_bytes(data)
    digest.update(data)
    return store.commit(temp, digest.hexdigest(), len(data), filename, owner)


@pytest.fixture()
def store(tmp_path) -> DatasetStore:
    return DatasetStore(
        tmp_path / "datasets",
        DatasetLimits(max_bytes=10**8, max_files=50, max_unpacked_bytes=100_000, storage_per_owner=300_000),
    )


def leftovers(store: DatasetStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".lock-"))


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([("a", b"1"), ("a/b", b"2")], "both a file and a folder"),
        ([("a/b", b"2"), ("a", b"1")], "both a file and a folder"),
        ([(".", b"1")], "outside"),
        ([("./x.csv", b"1")], "outside"),
        ([(".evil.csv.dataset.json", b"not json")], "reserved"),
        ([("sub/.x.csv.dataset.json", b"{}")], "reserved"),
        ([("shapes.zip", b"PK overwritten")], "archive's own name"),
        ([("x.csv", b"1"), ("x.csv", b"2")], "appears twice"),
        ([("a\\..\\..\\x", b"1")], "outside"),
    ],
)
def test_bad_archive_entries_are_refused_with_nothing_left_behind(store, entries, words):
    with pytest.raises(DatasetError, match=words):
        upload(store, make_zip(entries), "shapes.zip")
    assert leftovers(store) == []


def test_entry_count_is_limited(store):
    with pytest.raises(DatasetTooLargeError, match="DUET_MAX_DATASET_FILES"):
        upload(store, make_zip([(f"{i}.txt", b"") for i in range(51)]), "many.zip")


def test_unpacked_bytes_are_counted_while_unpacking_not_taken_from_headers(store):
    bomb = make_zip([("a.csv", b"0" * 60_000), ("b.csv", b"0" * 60_000)], zipfile.ZIP_DEFLATED)
    assert len(bomb) < 2_000
    with pytest.raises(DatasetTooLargeError, match="DUET_MAX_DATASET_UNPACKED_BYTES"):
        upload(store, bomb, "bomb.zip")
    assert leftovers(store) == []
    # A header that lies about the size changes nothing: the bytes are counted as written.
    lying = bytearray(make_zip([("big.csv", b"1" * 150_000)]))
    for marker in (b"PK\x03\x04", b"PK\x01\x02"):
        start = lying.find(marker)
        offset = 22 if marker == b"PK\x03\x04" else 24  # uncompressed size field
        lying[start + offset : start + offset + 4] = (10).to_bytes(4, "little")
    with pytest.raises(DatasetError):
        upload(store, bytes(lying), "liar.zip")
    assert leftovers(store) == []


def test_storage_is_limited_per_key(store):
    first = upload(store, b"x" * 200_000, "a.txt", owner="alice")
    assert store.usage("alice") == 200_000 and store.usage("bob") == 0
    with pytest.raises(DatasetTooLargeError, match="storage for datasets is full: API key 'alice'") as error:
        upload(store, b"y" * 150_000, "b.txt", owner="alice")
    assert error.value.code == "dataset_storage_full"
    assert upload(store, b"y" * 150_000, "b.txt", owner="bob").files == 1  # bob has his own allowance
    # an archive that would unpack past what is left fails while unpacking
    with pytest.raises(DatasetTooLargeError, match="alice"):
        upload(store, make_zip([("c.csv", b"0" * 99_950)], zipfile.ZIP_DEFLATED), "c.zip", owner="alice")
    assert upload(store, b"x" * 200_000, "a.txt", owner="alice") == first  # the same upload again: free


def test_an_archive_entry_never_replaces_a_stored_file(store):
    data = make_zip([("notes.txt", b"from the archive")])
    notes = upload(store, data, "notes.txt")  # the archive's bytes, stored under a name one of its entries has
    with pytest.raises(DatasetError, match="would replace a different file"):
        upload(store, data, "shapes.zip")
    folder = store.root / notes.id
    assert (folder / "notes.txt").read_bytes() == data  # what notes.txt's manifest describes
    # and the reverse: a name that is already an entry of an archive with these bytes
    other = make_zip([("pairs.jsonl", b'{"anchor": "a", "positive": "b"}\n')])
    upload(store, other, "other.zip")
    with pytest.raises(DatasetError, match="already a file of this dataset"):
        upload(store, other, "pairs.jsonl")


def test_an_entry_named_like_a_manifest_never_replaces_a_stored_file(store):
    # '.dataset.json' is how our manifests end, but only '.<name>.dataset.json' is one: an upload
    # named 'x.dataset.json' is a plain stored file, which the same bytes as an archive holding
    # an entry 'x.dataset.json' with other content overwrote (its manifest's sha256 then lied)
    data = make_zip([("x.dataset.json", b'{"evil": true}')])
    plain = upload(store, data, "x.dataset.json")
    with pytest.raises(DatasetError, match="would replace a different file"):
        upload(store, data, "shapes.zip")
    assert (store.root / plain.id / "x.dataset.json").read_bytes() == data


def test_listing_survives_anything_on_disk(store):
    good = upload(store, b'{"anchor": "a", "positive": "b"}\n', "pairs.jsonl")
    bad = store.root / "0123456789abcdef"
    bad.mkdir()
    (bad / ".evil.csv.dataset.json").write_text("not json")
    (bad / ".list.csv.dataset.json").write_text("[1, 2]")
    (bad / ".extra.csv.dataset.json").write_text(json.dumps({"id": "x", "surprise": 1}))
    (store.root / "stray-file").write_text("x")
    assert [d.path for d in store.list()] == [good.path]
    assert "owners" not in good.to_dict() and "disk_bytes" not in good.to_dict()


def test_a_good_archive_unpacks_and_counts_its_files(store):
    info = upload(store, make_zip([("data/pairs.jsonl", b"{}\n"), ("img/", b""), ("img/a.png", b"png")]), "set.zip")
    assert info.files == 3 and info.disk_bytes == info.bytes + 6
    assert (store.root / info.id / "img" / "a.png").read_bytes() == b"png"


def test_each_owner_sees_its_own_datasets(store):
    alices = upload(store, b"a\n", "a.txt", owner="alice")
    upload(store, b"b\n", "b.txt", owner="bob")
    assert [d.path for d in store.list("alice")] == [alices.path] and len(store.list()) == 2
    assert store.visible(alices.path, "alice") and not store.visible(alices.path, "bob")
    assert not store.visible("nonexistent/a.txt", "alice") and not store.visible("", "alice")
    upload(store, b"a\n", "a.txt", owner="bob")  # the same bytes: bob's too, stored once
    assert store.visible(alices.path, "bob") and store.usage("bob") == 4
