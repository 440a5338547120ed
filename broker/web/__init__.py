"""HTTP plumbing shared by the apps: the ASGI wiring, bounded bodies and heads, request logs,
OpenAPI, metrics and readiness."""
