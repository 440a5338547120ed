"""Stripe webhook ingestion: signature check, event -> license transition, transaction, publish."""
