"""license-broker core: settings, storage, the event log and the transports."""
