"""Alias writes at once, against a real milvus-lite server: milvus-lite (3.2) saves its alias table through
one shared temp file without a lock, so concurrent alias writes used to fail one of them with
`No such file or directory: ...aliases.json.tmp` (a create answered 500 in the concurrency test in CI).
Two connections stand for two replicas: their threads share no lock, so the cross-process path (take the
lost save for what it is, save again) is met too."""

from __future__ import annotations

import threading
import uuid

import pytest

from index.milvus.client import MilvusConnection

pytestmark = pytest.mark.milvus

THREADS_PER_CONNECTION = 4
ROUNDS = 12


def _make_collection(client, name: str) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index("v", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index)


def test_concurrent_alias_writes_from_two_connections_all_land(milvus_uri):
    prefix = f"ar{uuid.uuid4().hex[:10]}"
    connections = [MilvusConnection(milvus_uri, None, None, 30.0) for _ in range(2)]
    workers = [(conn, f"{prefix}_{c}_{t}") for c, conn in enumerate(connections) for t in range(THREADS_PER_CONNECTION)]
    client, _ = connections[0].client()
    for _, name in workers:
        _make_collection(client, f"{name}_g1")
        _make_collection(client, f"{name}_g2")
    errors: list[str] = []
    barrier = threading.Barrier(len(workers))

    def churn(conn: MilvusConnection, name: str) -> None:
        barrier.wait()
        try:
            for _ in range(ROUNDS):
                conn.call("create_alias", f"{name}_g1", name)
                conn.call("alter_alias", f"{name}_g2", name)
                conn.call("drop_alias", name)
            conn.call("create_alias", f"{name}_g1", name)
            conn.call("alter_alias", f"{name}_g2", name)
        except Exception as exc:  # the assertion below names it
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=churn, args=worker) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert errors == []
        for _, name in workers:
            assert client.describe_alias(name)["collection_name"] == f"{name}_g2"
    finally:
        for _, name in workers:
            for physical in (f"{name}_g1", f"{name}_g2"):
                connections[0].call("drop_collection", physical)
        for conn in connections:
            conn.close()
