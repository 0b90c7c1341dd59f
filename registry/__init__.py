"""Model registry: immutable model versions, movable aliases, and a manifest per version.

Backed by MLflow's model registry (embedded SQLite + local artifact folder by default, a
remote tracking server and object storage when configured) behind the thin interface in
`registry.store`. Nothing outside this package talks to MLflow directly.
"""
