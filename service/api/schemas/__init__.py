"""Pydantic request and response models (the OpenAPI contract)."""
