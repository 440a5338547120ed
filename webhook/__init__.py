"""Stripe webhooks over HTTP: verify the signature, call the ingest use case (broker.ingest), answer."""
