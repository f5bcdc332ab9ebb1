"""fedleak: measure how much private data a curious federated-learning server can reconstruct."""

__version__ = "0.1.0"
