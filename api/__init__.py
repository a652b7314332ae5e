"""The HTTP API, the review pages and the admin dashboard, and the `draftloop` CLI."""
