"""sparsebert: make BERT-family encoders sparse, and keep them accurate, robust and fast."""

__version__ = "0.1.0"

from sparsebert.errors import SparseBertError

__all__ = ["SparseBertError", "__version__"]
