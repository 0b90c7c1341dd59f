"""Collections: a durable SQLite store per collection (the truth) and a FAISS index derived
from it (snapshotted, replayed forward on start). Imports numpy, faiss, sqlite3 and orjson only."""
