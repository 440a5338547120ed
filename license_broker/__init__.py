"""The composition root: the `license-broker` command and the embedded app that wires
`webhook` and `stream` onto one `broker` runtime."""
