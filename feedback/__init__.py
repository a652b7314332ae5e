"""The system of record: tenants, API keys, drafts, corrections and the review queue."""
