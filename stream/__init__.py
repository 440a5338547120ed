"""The SSE stream: auth, the per-process subscription hub, catch-up, heartbeats, the client."""
