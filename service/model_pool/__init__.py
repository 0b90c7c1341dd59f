"""Loaded model versions: the pool that serves them, and the parts it leans on.

- `pool`: resolves a model reference, loads the version on first use, and keeps the loaded
  versions within the memory budget (least recently used idle ones go first);
- `hot_swap`: the alias watcher, which moves an alias to a new version only once it is warm;
- `cpu_policy`: batch size, forward passes at once and torch threads for the device;
- `errors`: what the pool refuses (`service.errors` maps it to HTTP).
"""
