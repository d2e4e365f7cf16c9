"""loraplex core: pure-PyTorch adaptation engine (no HTTP, no SQL, no tenants)."""
