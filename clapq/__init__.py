"""clapq: self-hosted semantic search for audio libraries (shared code)."""

__version__ = "0.1.0"
