"""oncolite edge runtime: what goes onto a device. numpy, pillow and a LiteRT interpreter; no TensorFlow."""

__version__ = "0.1.0"
