"""Drafting replies on the shared base model. `base_model.py` loads it, `prompt.py` builds the
one prompt (and holds the end-of-turn token), `drafting.py` holds the drafter and its backends'
interface, `stream.py` the token stream both backends hand their tokens to and the one rule
that ends a draft. The local backend is the in-process engine (`engine.py`, the scheduler) over
the Llama forward (`llama.py`) with its weight formats (`weights.py`: float, int8, int4), the
KV cache (`kv_cache.py`) and the LoRA adapters with their stacking per batch (`adapters.py`);
the remote one drafts through vLLM or another draftloop process (`remote.py`). `repetition.py`
guards drafts against cycles; `threads.py` runs one-off torch work in a thread that ends."""
