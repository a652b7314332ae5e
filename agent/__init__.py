"""Base model loading, prompt building, drafting, and the adapter cache."""
