"""chunkd: a chunked, resumable upload server that keeps all its state in files."""

__version__ = "0.1.0"
