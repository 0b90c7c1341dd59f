"""The model library: build, load, run and save contrastive encoders.

Importing this package is cheap on purpose: torch and sentence-transformers are imported
by the submodules that need them (`encoders.encoder`, `encoders.dual`), so the CLI and the
registry can use the light pieces (`encoders.contract`, `encoders.images`) without paying
for the deep-learning stack.
"""
