"""Held-out evaluation: per-example NLL of the reviewers' final text, chrF of greedy drafts on a
bounded sample, and the promotion gate with a paired bootstrap confidence interval."""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sacrebleu.metrics import CHRF
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agent.drafting import generate_greedy, stop_token_ids
from agent.prompt import prompt_token_ids

END_OF_TURN = "<|im_end|>"


def _completion_ids(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[int]:
    """The reply and the end-of-turn token: what the model must produce, as in training."""
    ids = tokenizer(row["completion"][0]["content"], add_special_tokens=False).input_ids
    return [*ids, tokenizer.convert_tokens_to_ids(END_OF_TURN)]


@torch.inference_mode()
def example_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], batch_size: int = 8):
    """Mean token negative log-likelihood of each row's completion given its prompt."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        pairs = [(prompt_token_ids(tokenizer, row["prompt"]), _completion_ids(tokenizer, row)) for row in batch]
        width = max(len(p) + len(c) for p, c in pairs)
        input_ids = torch.full((len(batch), width), pad_id)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (prompt, completion) in enumerate(pairs):
            ids = prompt + completion
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, len(prompt) : len(ids)] = torch.tensor(completion)
        device = model.device
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        mask = targets != -100
        scores.extend(((losses * mask).sum(1) / mask.sum(1)).tolist())
    return scores


def greedy_drafts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_new_tokens: int, batch_size=8
) -> list[str]:
    """Greedy drafts for the rows' prompts, as the agent drafts them, in batches."""
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    drafts = []
    for start in range(0, len(rows), batch_size):
        prompts = [prompt_token_ids(tokenizer, row["prompt"]) for row in rows[start : start + batch_size]]
        outputs = generate_greedy(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
        drafts.extend(tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs)
    return drafts


def example_chrf(drafts: list[str], references: list[str]) -> list[float]:
    metric = CHRF()
    return [
        metric.sentence_score(draft, [reference]).score for draft, reference in zip(drafts, references, strict=True)
    ]


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    examples: int
    champion_nll: float
    candidate_nll: float
    relative_improvement: float  # (champion - candidate) / champion, on mean NLL
    ci_low: float  # 95% paired bootstrap interval of the mean per-example NLL improvement
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def decide(
    champion_nll: list[float],
    candidate_nll: list[float],
    *,
    margin: float,
    min_examples: int,
    resamples: int = 2000,
    seed: int = 0,
) -> GateDecision:
    """Promote only if the candidate's held-out NLL is lower than the champion's by at least
    `margin` (relative) and the 95% bootstrap interval of the paired improvement excludes zero."""
    champion, candidate = np.asarray(champion_nll), np.asarray(candidate_nll)
    assert champion.shape == candidate.shape, "both must be scored on the same held-out rows"
    n = len(champion)
    if n == 0:
        return GateDecision(False, f"no held-out examples; at least {min_examples} are needed", 0, *[float("nan")] * 5)
    improvement = champion - candidate
    means = np.random.default_rng(seed).choice(improvement, size=(resamples, n), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    relative = float(improvement.mean() / champion.mean())
    if n < min_examples:
        promote, reason = False, f"only {n} held-out examples; the gate needs at least {min_examples}"
    elif relative < margin:
        promote, reason = False, f"held-out NLL improved by {relative:.1%}, below the {margin:.1%} margin"
    elif low <= 0:
        promote, reason = False, f"improvement not significant: 95% CI [{low:.4f}, {high:.4f}] includes zero"
    else:
        promote, reason = (
            True,
            f"held-out NLL {champion.mean():.3f} -> {candidate.mean():.3f} ({relative:.1%} better), "
            f"95% CI of the improvement [{low:.4f}, {high:.4f}]",
        )
    return GateDecision(
        promote, reason, n, float(champion.mean()), float(candidate.mean()), relative, float(low), float(high)
    )
