"""The engine: sequences scheduled over the pipeline's lanes (see api.py)."""
