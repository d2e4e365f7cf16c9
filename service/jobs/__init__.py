"""Fine-tuning jobs: creation checks, the database-backed queue, method validation."""
