"""HTTP layer: routes, schemas, dependencies and the error shape."""
