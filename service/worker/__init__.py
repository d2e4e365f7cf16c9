"""The background worker: claims queued jobs, trains them with core, stores the adapter."""
