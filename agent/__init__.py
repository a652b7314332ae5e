"""Base model loading, prompt building and drafting."""

from agent.drafting import Drafter, DraftResult, get_drafter
from agent.model import LoadedModel, load_base_model, load_tokenizer
from agent.prompt import IncomingEmail, build_messages, build_prompt_completion, trim_quoted_history

__all__ = [
    "DraftResult",
    "Drafter",
    "IncomingEmail",
    "LoadedModel",
    "build_messages",
    "build_prompt_completion",
    "get_drafter",
    "load_base_model",
    "load_tokenizer",
    "trim_quoted_history",
]
