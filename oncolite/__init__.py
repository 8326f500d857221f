"""oncolite: one CLI over the data, train, quantize, edge-runtime and benchmark stages."""
