"""Serving: the batcher thread owns the engine and plans batches; a small pool computes them."""
