"""Layer 6, operations: the HTTP server (health, readiness, metrics, status page), metrics aggregation, history and charts, AsyncAPI, CLI tools."""
