"""Serving: one inference thread owns the engine; requests reach it through the batcher."""
