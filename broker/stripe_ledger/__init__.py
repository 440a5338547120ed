"""The Stripe ledger: what a license is, from its Stripe objects (pure rules, their storage, binding, refresh)."""
