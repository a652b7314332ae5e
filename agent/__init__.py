"""Base model loading, prompt building, drafting through the serving engine with its repetition
guard, and the adapter cache."""
