"""The milvus collections backend: `MilvusBackend` (index.milvus.manager) stores Duet collections in a
Milvus server (or milvus-lite), so any number of API replicas share them with no shared disk.

Modules: `names` (Milvus names for Duet collections), `expressions` (Duet filters compiled to Milvus
boolean expressions), `client` (a lazily connected client that maps failures to Duet's errors),
`collection` (one collection handle), `reembed` (the re-embed job), `manager` (the backend).
"""
