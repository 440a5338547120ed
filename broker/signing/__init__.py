"""Signing: the leases apps verify offline and the tokens that open streams."""
