"""Tenants and API keys: creation, hashing, lookup and first-start bootstrap."""
