"""Guards against repetition in greedy drafts, applied per row by the serving engine.

A small model decoding greedily can fall into a cycle ("Hello,\\n\\nHello,\\n\\n...") that it never
leaves until the token limit. Two kinds of guard, chosen per request:

- logits processors with the semantics users know: `repetition_penalty` and
  `no_repeat_ngram_size` exactly as transformers' `generate` applies them (over the prompt and the
  draft so far; the engine's tokens equal `generate`'s with the same settings, tested), and
  OpenAI's `frequency_penalty` / `presence_penalty` (over the draft's own tokens);
- a cycle stop: a draft whose last tokens are one block repeated CYCLE_REPEATS times is
  finished at the end of the block's first copy, with finish reason "repetition".
"""

from dataclasses import dataclass

import torch

CYCLE_REPEATS = 3  # copies of a block in a row that make a cycle
CYCLE_MIN_TOKENS = 12  # and together at least this many tokens (so "no, no, no" is not one)


@dataclass(frozen=True)
class RepetitionGuard:
    repetition_penalty: float = 1.0  # > 1 penalises tokens already in the prompt or the draft
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice (prompt included)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per earlier use in the draft
    presence_penalty: float = 0.0  # OpenAI's: subtracted once if used in the draft at all
    stop_cycles: bool = False  # the engine's default is plain greedy; the server's is in settings

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}"
            for name, ok, rule in [
                ("repetition_penalty", 1.0 <= self.repetition_penalty <= 2.0, "between 1 and 2"),
                ("no_repeat_ngram_size", 0 <= self.no_repeat_ngram_size <= 64, "between 0 and 64"),
                ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "between -2 and 2"),
                ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "between -2 and 2"),
            ]
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def processes_logits(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size > 0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


class RowPenalties:
    """One row's logits processors and the token history they need, updated token by token."""

    def __init__(self, guard: RepetitionGuard, prompt: list[int], vocab_size: int, device: torch.device):
        self.guard = guard
        self.history = list(prompt)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # in prompt or draft
        self.seen[torch.tensor(prompt, device=device)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # in the draft
        self.ngrams: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> the tokens that followed it
        n = guard.no_repeat_ngram_size
        for end in range(n, len(prompt) + 1) if n else ():
            self._record(self.history[end - n : end])

    def _record(self, ngram: list[int]) -> None:
        self.ngrams.setdefault(tuple(ngram[:-1]), set()).add(ngram[-1])

    def apply(self, logits: torch.Tensor) -> None:
        """Adjust one row's float32 logits [vocab] in place, in transformers' processor order."""
        guard = self.guard
        if guard.repetition_penalty != 1.0:
            penalty = guard.repetition_penalty
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits.copy_(torch.where(self.seen, penalised, logits))
        if (n := guard.no_repeat_ngram_size) and len(self.history) + 1 >= n:
            banned = self.ngrams.get(tuple(self.history[len(self.history) - n + 1 :]), ())
            if banned:
                logits[list(banned)] = -float("inf")
        if guard.frequency_penalty or guard.presence_penalty:
            logits -= self.counts * guard.frequency_penalty + (self.counts > 0) * guard.presence_penalty

    def push(self, token: int) -> None:
        self.history.append(token)
        self.seen[token] = True
        self.counts[token] += 1
        if n := self.guard.no_repeat_ngram_size:
            if len(self.history) >= n:
                self._record(self.history[-n:])


def cycle_start(tokens: list[int]) -> int | None:
    """Where the repeats begin if `tokens` ends in one block repeated in a row, at least
    CYCLE_REPEATS times and CYCLE_MIN_TOKENS tokens; the draft is kept up to there, one copy."""
    count = len(tokens)
    for period in range(1, count // CYCLE_REPEATS + 1):
        repeats = max(CYCLE_REPEATS, -(-CYCLE_MIN_TOKENS // period))
        if repeats * period > count or tokens[-1] != tokens[-1 - period]:
            continue
        block = tokens[count - period :]
        if all(tokens[count - k * period : count - (k - 1) * period] == block for k in range(2, repeats + 1)):
            return count - (repeats - 1) * period
    return None
