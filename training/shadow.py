"""Shadow drafting: a candidate that passed the gate proves itself on live mail before it serves.

A tenant with `shadow_corrections` = N puts such a candidate in shadow (training/pipeline.py,
registry.start_shadow) instead of promoting it. While in shadow, every email the champion drafts
is drafted by the shadow too, submitted with it so that both decode in the same batch; the
champion's draft is stored and shown as always, the shadow's is stored beside it (ShadowDraft) and
never shown. When a reviewer's correction with a final text is stored (an accepted draft's final
text is the champion's draft), both drafts are scored against it, in the correction's
transaction: chrF (sacrebleu's, as the evaluation scores drafts) and the word edit distance.

Once N corrections are scored, the shadow is decided, under the tenant's lock, once: with the
paired differences d_i = chrF(shadow_i) - chrF(champion_i), it is promoted if the lower bound of
the 95% bootstrap interval of their mean is above zero (the gate's paired bootstrap,
evaluate.paired_interval) and the interval of the paired edit-word differences is not above zero
(a longer draft can gain chrF and still leave the reviewer more to change), and rejected
otherwise; the reason gives n, both mean chrF and mean
edit words, the mean difference and its interval, and the audit row keeps the same figures
(`scores`). A promotion still checks the version's files and base model (registry.promote); one
that fails them rejects the shadow with that reason. The decision runs after the correction has
committed and never fails it: the sweep (training/scheduling.due_shadows) decides what is left."""

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.adapters import AdapterRef
from agent.drafting import Drafter
from agent.stream import TokenStream
from core import metrics
from core.db import Sessions
from core.errors import DomainError, Invalid
from core.settings import Settings
from feedback.diff import word_edit_distance
from feedback.models import Correction, Draft, Tenant, utcnow
from training import registry
from training.models import Adapter, AdapterEvent, ShadowDraft
from training.registry import AdapterInvalid

log = logging.getLogger(__name__)

MIN_CORRECTIONS, MAX_CORRECTIONS = 5, 10_000
ACTOR = "shadow"  # the actor of a decision's audit row (which alone has `scores`)


def check_corrections(count: int) -> int:
    """A number of live corrections a shadow may be decided on: too few cannot show a difference."""
    if not MIN_CORRECTIONS <= count <= MAX_CORRECTIONS:
        raise Invalid(f"shadow_corrections must be from {MIN_CORRECTIONS} to {MAX_CORRECTIONS}, not {count}")
    return count


def set_corrections(session: Session, tenant: Tenant, count: int | None, *, actor: str) -> Tenant:
    """Decide the tenant's next candidates after `count` live corrections in shadow; None: promote
    them at once, and a shadow running now is rejected (shadow drafting is turned off)."""
    registry.lock_tenant(session, tenant.id)  # a run putting its candidate in shadow reads it under this lock
    tenant.shadow_corrections = check_corrections(count) if count is not None else None
    if count is None and (running := registry.shadow(session, tenant.id)) is not None:
        registry.reject(session, running, actor=actor, reason=f"shadow drafting was turned off by {actor}")
    session.flush()
    return tenant


# Drafting ----------------------------------------------------------------------------------


def serving_ref(session: Session, settings: Settings, tenant_id: int, base_fingerprint: str) -> AdapterRef | None:
    """The tenant's shadow as the agent loads it, or None: no shadow, or one whose files fail the
    checks (logged and counted as failed drafts; the champion drafts as always)."""
    running = registry.shadow(session, tenant_id)
    if running is None:
        return None
    try:
        return registry.serving_ref(session, settings, running, base_fingerprint)
    except AdapterInvalid as error:
        metrics.SHADOW_DRAFTS.labels("failed").inc()
        log.warning("tenant %s drafts without its shadow v%s: %s", tenant_id, running.version, error)
        return None


def store_drafts(
    sessions: Sessions, drafter: Drafter, adapter_id: int, shadowed: Sequence[tuple[int, list[int], TokenStream]]
) -> None:
    """Wait for the shadow's drafts and store each beside the champion's draft it shadows (draft
    id, prompt, the shadow's stream). Best effort: the champion's drafts are stored already, so a
    failure is counted and logged, never raised. A draft corrected in the meantime is scored now."""
    results = []
    for draft_id, prompt, stream in shadowed:
        try:
            results.append((draft_id, drafter.result(prompt, stream)))
        except Exception as error:
            metrics.SHADOW_DRAFTS.labels("failed").inc()
            log.warning("the shadow's draft of draft %s failed: %s", draft_id, error)
    if not results:
        return
    try:
        with sessions() as session:
            for draft_id, result in results:
                row = ShadowDraft(
                    draft_id=draft_id,
                    adapter_id=adapter_id,
                    text=result.text,
                    finish_reason=result.finish_reason,
                    tokens_generated=result.tokens_generated,
                )
                session.add(row)
                correction = session.scalar(select(Correction).where(Correction.draft_id == draft_id))
                if correction is not None and correction.final_text is not None:
                    _score(row, session.get(Draft, draft_id).draft_text, correction)
    except Exception as error:
        metrics.SHADOW_DRAFTS.labels("failed").inc(len(results))
        log.warning("the shadow's drafts of drafts %s were not stored: %s", [d for d, _ in results], error)
        return
    metrics.SHADOW_DRAFTS.labels("stored").inc(len(results))


# Scoring -----------------------------------------------------------------------------------


def _score(row: ShadowDraft, champion_text: str, correction: Correction) -> None:
    from training.evaluate import example_chrf  # sacrebleu and torch: only once there is a shadow draft to score

    final = correction.final_text
    row.champion_chrf, row.shadow_chrf = example_chrf([champion_text, row.text], [final, final])
    row.champion_edit_words = correction.edit_words  # word_edit_distance(champion_text, final)
    row.shadow_edit_words = word_edit_distance(row.text, final)
    row.scored_at = utcnow()


def score_correction(session: Session, correction: Correction) -> bool:
    """Score the shadow's draft of the corrected draft, if there is one, in the correction's
    transaction (the caller commits); a failure is logged and leaves the correction as it is.
    Returns whether a shadow draft was scored: the shadow may be due a decision once the
    correction has committed."""
    if correction.final_text is None:  # a rejection without a replacement: nothing to compare with
        return False
    try:
        with session.begin_nested():
            row = session.scalar(select(ShadowDraft).where(ShadowDraft.draft_id == correction.draft_id))
            if row is None or row.scored_at is not None:
                return False
            _score(row, correction.draft.draft_text, correction)
    except Exception:
        log.exception("the shadow's draft of draft %s was not scored", correction.draft_id)
        return False
    return True


# The live comparison and the decision -----------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A shadow against the champion on the live corrections scored so far."""

    shadow_version: int
    champion_version: int | None  # None: the bare base model
    champion_inherited: bool  # the champion is the organization's (a team without its own)
    needed: int | None  # the tenant's shadow_corrections
    drafts: int  # the shadow's drafts stored
    scored: int  # of them, scored against a correction's final text
    champion_chrf: float | None
    shadow_chrf: float | None
    champion_edit_words: float | None
    shadow_edit_words: float | None
    difference: float | None  # mean of chrF(shadow) - chrF(champion), paired
    ci_low: float | None  # its 95% paired bootstrap interval (from 2 scored corrections)
    ci_high: float | None
    edit_difference: float | None  # mean of edit words(shadow) - edit words(champion), paired
    edit_ci_low: float | None  # its 95% paired bootstrap interval
    edit_ci_high: float | None

    def as_json(self) -> dict:
        return {key: round(v, 4) if isinstance(v, float) else v for key, v in asdict(self).items()}

    @property
    def better(self) -> bool:
        """Closer to the reviewers' texts (chrF's interval above 0), and not at the cost of more
        words to edit (the edit difference's interval not above 0): a longer draft can gain chrF
        and still leave the reviewer more to change."""
        return self.ci_low is not None and self.ci_low > 0 and not self.more_edits

    @property
    def more_edits(self) -> bool:
        return self.edit_ci_low is not None and self.edit_ci_low > 0

    def summary(self) -> str:
        """The figures in words, as a decision's reason gives them."""
        champion = "the base model"
        if self.champion_version:
            owner = "the organization's " if self.champion_inherited else ""
            champion = f"{owner}champion v{self.champion_version}"
        if not self.scored:
            return f"no corrections scored yet; shadow v{self.shadow_version} against {champion}"
        ci = f", 95% CI [{self.ci_low:+.2f}, {self.ci_high:+.2f}]" if self.ci_low is not None else ""
        edits = ""
        if self.edit_difference is not None:
            edits = f"; mean edit-words difference {self.edit_difference:+.1f}"
            if self.edit_ci_low is not None:
                edits += f", 95% CI [{self.edit_ci_low:+.1f}, {self.edit_ci_high:+.1f}]"
        return (
            f"{self.scored} corrections: chrF {self.shadow_chrf:.1f} (shadow v{self.shadow_version}) vs "
            f"{self.champion_chrf:.1f} ({champion}), edit words {self.shadow_edit_words:.1f} vs "
            f"{self.champion_edit_words:.1f}; mean chrF difference {self.difference:+.2f}{ci}{edits}"
        )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def comparison(session: Session, shadow: Adapter) -> Comparison:
    scored = session.execute(
        select(
            ShadowDraft.champion_chrf,
            ShadowDraft.shadow_chrf,
            ShadowDraft.champion_edit_words,
            ShadowDraft.shadow_edit_words,
        )
        .where(ShadowDraft.adapter_id == shadow.id, ShadowDraft.scored_at.is_not(None))
        .order_by(ShadowDraft.scored_at, ShadowDraft.id)
    ).all()
    drafts = session.scalar(select(func.count()).select_from(ShadowDraft).where(ShadowDraft.adapter_id == shadow.id))
    from training.evaluate import paired_interval  # the gate's module: torch and sacrebleu, imported on use

    def interval(values: list[float]) -> tuple[float | None, float | None]:
        low, high = paired_interval(values) if len(values) >= 2 else (None, None)
        return tuple(None if v is None or math.isnan(v) else v for v in (low, high))

    differences = [s - c for c, s, _, _ in scored]
    edits = [s - c for _, _, c, s in scored if c is not None and s is not None]
    (chrf_low, chrf_high), (edit_low, edit_high) = interval(differences), interval(edits)
    current = registry.drafting_adapter(session, shadow.tenant_id)  # what the shown drafts came from
    return Comparison(
        shadow_version=shadow.version,
        champion_version=current.version if current else None,
        champion_inherited=current is not None and current.tenant_id != shadow.tenant_id,
        needed=session.get(Tenant, shadow.tenant_id).shadow_corrections,
        drafts=drafts or 0,
        scored=len(scored),
        champion_chrf=_mean([r[0] for r in scored]),
        shadow_chrf=_mean([r[1] for r in scored]),
        champion_edit_words=_mean([r[2] for r in scored]),
        shadow_edit_words=_mean([r[3] for r in scored]),
        difference=_mean(differences),
        ci_low=chrf_low,
        ci_high=chrf_high,
        edit_difference=_mean(edits),
        edit_ci_low=edit_low,
        edit_ci_high=edit_high,
    )


@dataclass(frozen=True)
class Status:
    """What the API, the CLI and the dashboard show: the running shadow, and the last decision."""

    live: Comparison | None
    last_decision: AdapterEvent | None  # the audit row, its `scores` the comparison it was decided on


def status(session: Session, tenant_id: int) -> Status:
    running = registry.shadow(session, tenant_id)
    last = session.scalar(
        select(AdapterEvent)
        .where(AdapterEvent.tenant_id == tenant_id, AdapterEvent.scores.is_not(None))
        .order_by(AdapterEvent.id.desc())
        .limit(1)
    )
    return Status(comparison(session, running) if running is not None else None, last)


def decide(session: Session, settings: Settings, tenant_id: int) -> str | None:
    """Decide the tenant's shadow if it has its corrections: "promoted" or "rejected"; None when
    there is no shadow (decided already) or it is not due yet. Under the tenant's lock, so two
    corrections racing decide once. The caller commits."""
    registry.lock_tenant(session, tenant_id)
    running = registry.shadow(session, tenant_id)
    needed = session.get(Tenant, tenant_id, populate_existing=True).shadow_corrections
    if running is None or needed is None:
        return None
    live = comparison(session, running)
    if live.scored < needed:
        return None
    scores = live.as_json()
    if live.better:
        reason = f"{live.summary()}: better, promoted"
        try:
            with session.begin_nested():
                registry.promote(session, settings, running, actor=ACTOR, reason=reason, scores=scores)
        except DomainError as error:  # its files changed, or another base model is loaded
            reason = f"{live.summary()}: better, but not promoted: {error.message}"
        else:
            return "promoted"
    elif live.ci_low is not None and live.ci_low > 0:  # closer by chrF, but at the cost of more edits
        reason = f"{live.summary()}: more words to edit (their interval is above 0), rejected"
    else:
        reason = f"{live.summary()}: not better (the interval's lower bound is not above 0), rejected"
    registry.reject(session, running, actor=ACTOR, reason=reason, scores=scores)
    return "rejected"


def decide_after_correction(sessions: Sessions, settings: Settings, tenant_id: int) -> None:
    """After a correction committed: decide the tenant's shadow if it is due, in a transaction of
    its own. A failure is logged, never raised (the correction is stored); the sweep decides later."""
    try:
        with sessions() as session:
            decide(session, settings, tenant_id)
    except Exception:
        log.exception("the shadow of tenant %s was not decided; the sweep tries again", tenant_id)
