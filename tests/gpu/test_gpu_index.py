"""FAISS on the GPU gives the CPU's results (the CPU index stays the persisted truth)."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="needs faiss (faiss-gpu-cu12 for the GPU path)")

from index.config import CollectionConfig  # noqa: E402 (after the importorskip)
from index.engine import IndexSpec  # noqa: E402 (after the importorskip)
from index.items import StoredItem  # noqa: E402 (after the importorskip)
from index.manager import CollectionManager  # noqa: E402 (after the importorskip)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1, reason="needs faiss with a GPU"
    ),
]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_search_equals_cpu_search(tmp_path, kind):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = IndexSpec(kind=kind, nlist=256, nprobe=32)
    items = [StoredItem(str(i), "vector", v) for i, v in enumerate(vectors)]
    results = {}
    for use_gpu in (False, True):
        manager = CollectionManager(tmp_path / f"gpu{use_gpu}", use_gpu=use_gpu)
        collection = manager.create(CollectionConfig(name="c", dim=384, index=spec))
        for start in range(0, len(items), 20_000):
            collection.upsert(items[start : start + 20_000])
        manager.snapshot_dirty()  # refreshes the GPU copy after the writes
        assert collection.index.on_gpu is use_gpu
        hits = collection.search(vectors[:100], 10)
        results[use_gpu] = ([[h.id for h in row] for row in hits], np.array([[h.score for h in row] for row in hits]))
        manager.close()
    cpu_ids, cpu_scores = results[False]
    gpu_ids, gpu_scores = results[True]
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_ids, gpu_ids)])
    assert agreement >= 0.99  # ties at the 10th place may order differently
