"""loraplex service: the HTTP API, database, job queue and process wiring around ``core``."""
