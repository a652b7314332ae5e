"""Drafting replies on the shared base model. `base_model.py` loads it, `prompt.py` builds the
one prompt, `drafting.py` holds the drafter and its backends' interface. The local backend is
the in-process engine (`engine.py`, the scheduler) over the Llama forward (`llama.py`), the KV
cache (`kv_cache.py`) and the LoRA adapters with their stacking per batch (`adapters.py`); the
remote one drafts through vLLM or another draftloop process (`remote.py`). `repetition.py`
guards drafts against cycles."""
