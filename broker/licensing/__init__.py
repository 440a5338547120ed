"""License keys and machines (docs/desktop.md): the use cases behind the desktop-facing routes,
testable without HTTP. `keys` is the key format and its sealing, `store` the rows, `machines`
activation and release, `ratelimit` the attempt counters, `watch` what a stream process does
about released machines."""
