"""The one prompt builder, used for drafting and for training rows, so both see exactly the same text."""

import re
from dataclasses import dataclass

from transformers import GenerationConfig, PreTrainedTokenizerBase

from core.errors import Invalid

DEFAULT_INSTRUCTIONS = (
    "You are an email assistant. Write a polite, helpful and concise reply to the email below. "
    "Write only the body of the reply."
)
END_OF_TURN = "<|im_end|>"  # ChatML's: a reply ends with it, in training and in drafting
QUOTE_TRIMMED_MARK = "[quoted history trimmed]"
BODY_TRUNCATED_MARK = "[email truncated]"

# Where quoted history starts: "> " lines, "-----Original Message-----", "On <date>, <name> wrote:"
# (possibly wrapped onto a second line), or an Outlook "From: ... / Sent: ..." header block.
_QUOTE_START = re.compile(
    r"^[ \t]*>"
    r"|^[ \t]*-{2,}[ \t]*(?i:original message)[ \t]*-{2,}"
    r"|^[ \t]*On\b[^\n]*(?:\n[^\n]*)?\bwrote:[ \t]*$"
    r"|^[ \t]*From:[^\n]*\n[ \t]*Sent:",
    re.MULTILINE,
)


@dataclass(frozen=True)
class IncomingEmail:
    sender: str
    subject: str
    body: str


def trim_quoted_history(body: str, limit_chars: int) -> str:
    """Keep the new text; keep at most limit_chars of quoted history, marked when trimmed."""
    body = body.replace("\r\n", "\n").replace("\r", "\n").strip()
    match = _QUOTE_START.search(body)
    if match is None or len(body) - match.start() <= limit_chars:
        return body
    new_text = body[: match.start()].rstrip()
    kept_quote = body[match.start() : match.start() + limit_chars].rstrip()
    return "\n\n".join(part for part in (new_text, kept_quote, QUOTE_TRIMMED_MARK) if part)


def build_messages(instructions: str, email: IncomingEmail, *, quoted_history_chars: int) -> list[dict]:
    """[system = tenant instructions (or the default), user = the email]."""
    body = trim_quoted_history(_plain(email.body), quoted_history_chars)
    user = f"From: {_plain(email.sender)}\nSubject: {_plain(email.subject)}\n\n{body}"
    return [
        {"role": "system", "content": instructions.strip() or DEFAULT_INSTRUCTIONS},
        {"role": "user", "content": user},
    ]


def build_prompt_completion(instructions: str, email: IncomingEmail, reply: str, *, quoted_history_chars: int) -> dict:
    """A TRL conversational prompt/completion row (completion-only loss)."""
    return {
        "prompt": build_messages(instructions, email, quoted_history_chars=quoted_history_chars),
        "completion": [{"role": "assistant", "content": _plain(reply).strip()}],
    }


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The token ids the model sees: the chat template with the assistant turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def check_instructions(tokenizer: PreTrainedTokenizerBase, instructions: str, max_prompt_tokens: int) -> None:
    """Instructions may take half of the prompt budget; the other half is the email's."""
    empty = IncomingEmail(sender="", subject="", body="")
    taken = len(prompt_token_ids(tokenizer, build_messages(instructions, empty, quoted_history_chars=0)))
    if taken > max_prompt_tokens // 2:
        raise Invalid(
            f"the instructions take {taken} tokens of the prompt; at most {max_prompt_tokens // 2} may, half of the "
            f"prompt budget of {max_prompt_tokens} tokens (DRAFTLOOP_MAX_PROMPT_TOKENS), so that the email fits: "
            "shorten them"
        )


def fit_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_prompt_tokens: int) -> list[dict]:
    """Cut the end of the user message (the email) until the prompt fits in max_prompt_tokens.

    The system message and the chat-template tail are never cut: instructions that leave no room
    for the email are an Invalid error.
    """
    if len(prompt_token_ids(tokenizer, messages)) <= max_prompt_tokens:
        return messages
    *head, user = messages
    content_ids = tokenizer(user["content"], add_special_tokens=False).input_ids
    overhead = len(prompt_token_ids(tokenizer, [*head, {**user, "content": BODY_TRUNCATED_MARK}]))
    keep = max_prompt_tokens - overhead
    while keep > 0:
        content = tokenizer.decode(content_ids[:keep]).rstrip() + "\n\n" + BODY_TRUNCATED_MARK
        fitted = [*head, {**user, "content": content}]
        excess = len(prompt_token_ids(tokenizer, fitted)) - max_prompt_tokens
        if excess <= 0:
            return fitted
        keep -= excess
    raise Invalid(
        f"the instructions take {overhead} tokens of the prompt and leave no room for the email within the prompt "
        f"budget of {max_prompt_tokens} tokens; shorten the tenant's instructions (PATCH /v1/tenant) or raise "
        "DRAFTLOOP_MAX_PROMPT_TOKENS"
    )


def _plain(text: str) -> str:
    """Break chat-control markers such as <|im_end|> so email text cannot open or close a turn."""
    return text.replace("<|", "< |")


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch of prompts: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of END_OF_TURN, the token a reply ends with; None for a tokenizer without it."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return token_id if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == END_OF_TURN else None


def stop_token_ids(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the tokenizer's eos, the model's configured eos, and ChatML's <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    configured = generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.add(end_of_turn_id(tokenizer))
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return sorted(ids)
