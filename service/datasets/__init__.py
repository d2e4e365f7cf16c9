"""Datasets: edge validation (pure) and the stored row encoding."""
