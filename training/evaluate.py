"""Held-out evaluation: per-example NLL of the reviewers' final text; greedy drafts, decoded as
the agent serves them, scored by chrF, by whether they loop, and by house-style fidelity; and
the promotion gate with a paired bootstrap confidence interval, a rule against looping and a
guard against forgetting general writing."""

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sacrebleu.metrics import CHRF
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agent.adapters import AdapterRef
from agent.drafting import Drafter
from agent.prompt import end_of_turn_id, pad_token_id, prompt_token_ids


def _completion_ids(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[int]:
    """The reply and the end-of-turn token: what the model must produce, as in training."""
    ids = tokenizer(row["completion"][0]["content"], add_special_tokens=False).input_ids
    return [*ids, end_of_turn_id(tokenizer)]


@torch.inference_mode()
def example_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], batch_size: int = 8):
    """Mean token negative log-likelihood of each row's completion given its prompt."""
    pad_id = pad_token_id(tokenizer)
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


@dataclass(frozen=True)
class HeldoutDraft:
    text: str
    finish_reason: str  # "stop", "length" or "repetition" (a cycle the guard stopped: it loops)

    @property
    def loops(self) -> bool:
        return self.finish_reason == "repetition"


def greedy_drafts(
    drafter: Drafter, rows: list[dict], adapters: dict[str, AdapterRef | None], max_new_tokens: int
) -> dict[str, list[HeldoutDraft]]:
    """Each model's greedy drafts for the rows' prompts, through the serving engine with the
    server's repetition guard (its cycle stop always on, so that a loop is seen and counted).

    One model at a time: in bfloat16 a row's tokens can depend on which rows share its batch
    (the products' rounding changes with their shape), so a model's drafts never depend on
    another model's."""
    guard = drafter.guard_with(stop_cycles=True)
    prompts = [prompt_token_ids(drafter.tokenizer, row["prompt"]) for row in rows]
    drafts = {}
    for name, ref in adapters.items():
        streams = [drafter.submit(p, max_new_tokens=max_new_tokens, adapter=ref, guard=guard) for p in prompts]
        drafts[name] = [HeldoutDraft(drafter.text(s.result()), s.finish_reason) for s in streams]
    return drafts


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def example_chrf(drafts: list[str], references: list[str]) -> list[float]:
    metric = CHRF()
    return [
        metric.sentence_score(draft, [reference]).score for draft, reference in zip(drafts, references, strict=True)
    ]


# House-style fidelity, with no per-tenant rules: does the draft open and close as the reviewer's
# final text does, once what changes from email to email (numbers, and the names and words the
# incoming email brings) is masked?
OPENING_WORDS = 6  # the opening is the first line's first clause, at most this many words
CLOSING_LINES = 3  # the closing is the reference's last short lines (a sign-off), at most this many
CLOSING_LINE_WORDS = 5


def _masker(email_text: str):
    names = {w.casefold() for w in re.findall(r"[A-Z][\w'-]+", email_text)}

    def mask(line: str) -> str:
        line = re.sub(r"\w*\d[\w-]*", "<n>", line)
        words = [
            ("<name>" if w.casefold() in names else w.casefold()) for w in re.findall(r"<n>|[\w'-]+|[^\w\s]", line)
        ]
        return " ".join(words)

    return mask


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _opening(lines: list[str]) -> str:
    first = re.split(r"[,.!?:;]", lines[0])[0] if lines else ""
    return " ".join(first.split()[:OPENING_WORDS])


def _closing_count(reference_lines: list[str]) -> int:
    count = 0
    for line in reversed(reference_lines[1:]):
        if count == CLOSING_LINES or len(line.split()) > CLOSING_LINE_WORDS:
            break
        count += 1
    return max(count, 1)


def style_match(draft: str, reference: str, email_text: str) -> dict[str, bool]:
    """Whether the draft's opening and its closing lines equal the reference's, masked alike."""
    mask = _masker(email_text)
    ours, theirs = _lines(draft), _lines(reference)
    k = _closing_count(theirs)
    return {
        "opening": bool(ours) and mask(_opening(ours)) == mask(_opening(theirs)),
        "closing": len(ours) >= k and [mask(x) for x in ours[-k:]] == [mask(x) for x in theirs[-k:]],
    }


def score_drafts(drafts: list[HeldoutDraft], rows: list[dict]) -> dict[str, list]:
    """Per example: chrF against the reviewer's text, whether it loops, opening and closing match."""
    references = [row["completion"][0]["content"] for row in rows]
    emails = [row["prompt"][-1]["content"] for row in rows]
    styles = [style_match(d.text, r, e) for d, r, e in zip(drafts, references, emails, strict=True)]
    return {
        "chrf": example_chrf([d.text for d in drafts], references),
        "loops": [d.loops for d in drafts],
        "opening": [s["opening"] for s in styles],
        "closing": [s["closing"] for s in styles],
    }


@dataclass(frozen=True)
class Forgetting:
    """The forgetting guard's measure: the mean NLL of the regression set's general emails
    (training/regression_set.py), the bare base model's and a model's trained from it."""

    base_nll: float
    candidate_nll: float
    change: float  # (candidate - base) / base: positive is worse
    margin: float
    forgot: bool  # change above margin: never promoted
    verdict: str  # the measure and the verdict, in words


def forgetting(base_nll: list[float], candidate_nll: list[float], margin: float) -> Forgetting:
    base, candidate = float(np.mean(base_nll)), float(np.mean(candidate_nll))
    change = (candidate - base) / base
    forgot = change > margin
    verdict = (
        f"regression-set NLL {candidate:.3f} vs the base model's {base:.3f} ({change:+.1%}, "
        f"{'more than' if forgot else 'within'} the {margin:.1%} margin)"
    )
    return Forgetting(base, candidate, change, margin, forgot, verdict)


def paired_interval(differences, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of paired per-example differences (a fixed seed, so
    a decision can be repeated)."""
    values = np.asarray(differences, dtype=float)
    means = np.random.default_rng(seed).choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


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
    champion_loops: int  # held-out drafts that loop, of the same drafted examples
    candidate_loops: int
    forgetting: Forgetting  # the candidate against the bare base model on the regression set


def decide(
    champion_nll: list[float],
    candidate_nll: list[float],
    *,
    margin: float,
    min_examples: int,
    base_regression_nll: list[float],
    candidate_regression_nll: list[float],
    forgetting_margin: float,
    champion_loops: int = 0,
    candidate_loops: int = 0,
    resamples: int = 2000,
    seed: int = 0,
) -> GateDecision:
    """Promote only if the candidate's held-out NLL is lower than the champion's by at least
    `margin` (relative), the 95% bootstrap interval of the paired improvement excludes zero, its
    NLL on the regression set is no more than `forgetting_margin` (relative) above the bare base
    model's, and its held-out drafts loop no more often than the champion's."""
    champion, candidate = np.asarray(champion_nll), np.asarray(candidate_nll)
    assert champion.shape == candidate.shape, "both must be scored on the same held-out rows"
    guard = forgetting(base_regression_nll, candidate_regression_nll, forgetting_margin)
    n = len(champion)
    if n == 0:
        nan = float("nan")
        reason = f"no held-out examples; at least {min_examples} are needed"
        return GateDecision(False, reason, 0, nan, nan, nan, nan, nan, champion_loops, candidate_loops, guard)
    improvement = champion - candidate
    low, high = paired_interval(improvement, resamples=resamples, seed=seed)
    relative = float(improvement.mean() / champion.mean())
    if n < min_examples:
        promote, reason = False, f"only {n} held-out examples; the gate needs at least {min_examples}"
    elif relative < margin:
        promote, reason = False, f"held-out NLL improved by {relative:.1%}, below the {margin:.1%} margin"
    elif low <= 0:
        promote, reason = False, f"improvement not significant: 95% CI [{low:.4f}, {high:.4f}] includes zero"
    elif guard.forgot:
        promote, reason = (
            False,
            f"held-out NLL improved by {relative:.1%}, but it forgot general writing: {guard.verdict}",
        )
    elif candidate_loops > champion_loops:
        promote, reason = (
            False,
            f"held-out NLL improved by {relative:.1%}, but {candidate_loops} of its held-out drafts loop "
            f"against the champion's {champion_loops}",
        )
    else:
        promote, reason = (
            True,
            f"held-out NLL {champion.mean():.3f} -> {candidate.mean():.3f} ({relative:.1%} better), "
            f"95% CI of the improvement [{low:.4f}, {high:.4f}]",
        )
    return GateDecision(
        promote,
        reason,
        n,
        float(champion.mean()),
        float(candidate.mean()),
        relative,
        float(low),
        float(high),
        champion_loops,
        candidate_loops,
        guard,
    )


@dataclass(frozen=True)
class Versions:
    candidate: int
    champion: int | None
    champion_id: int | None  # the champion when the run was evaluated: promotion checks it is still so
    # the champion is the team's organization's: the team has none of its own yet
    champion_inherited: bool = False


@dataclass(frozen=True)
class EvaluationReport:
    """What the evaluation measured and the gate decided; stored (as_json) in report.json and,
    without per_example, in the run's report."""

    run_id: int
    versions: Versions
    scales: dict[str, float]  # model -> the scale its adapter was scored at (as it is served)
    heldout_examples: int
    drafted_examples: int
    regression_examples: int  # the forgetting guard's general emails, scored by the base and the candidate
    summary: dict[str, dict[str, float]]  # model -> its totals (summarize)
    # model -> score -> one value per held-out example (regression_nll: per regression-set email)
    per_example: dict[str, dict[str, list]]
    drafts: list[dict]  # per drafted example: the reference, each model's draft and finish reason
    decision: GateDecision
    training: dict | None = None  # what training did, added once the report is built

    def as_json(self) -> dict:
        return asdict(self)


def summarize(scores: dict[str, list]) -> dict[str, float]:
    """A model's totals: mean NLL and chrF; the share of drafts that loop, open and close as the
    reviewers' texts do, and do both ("style"); the mean regression-set NLL where it was scored."""
    style = [o and c for o, c in zip(scores["opening"], scores["closing"], strict=True)]
    regression = {"regression_nll": round(mean(scores["regression_nll"]), 4)} if "regression_nll" in scores else {}
    return {
        "nll": round(mean(scores["nll"]), 4),
        "chrf": round(mean(scores["chrf"]), 2),
        "loop_rate": round(mean(scores["loops"]), 3),
        "opening": round(mean(scores["opening"]), 3),
        "closing": round(mean(scores["closing"]), 3),
        "style": round(mean(style), 3),
    } | regression
