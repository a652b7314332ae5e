"""The HTTP API, the CLI and (later) the review page."""
