"""Request and response bodies, with the examples shown in the OpenAPI docs, and the types every
input of the API and the pages is checked with at the edge."""

from datetime import datetime
from typing import Annotated

from annotated_types import Interval
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WrapValidator

from feedback.models import Role, Split, Verdict
from feedback.service import MAX_ADAPTER_SCALE, check_adapter_scale
from training import compose, shadow
from training.config import TrainOverrides

# Every id and version column is a PostgreSQL `integer`: ids outside its range name nothing stored.
Id = Annotated[int, Interval(ge=1, le=2**31 - 1)]


def _storable(value, bounded):
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain NUL characters (\\u0000)")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must not contain lone surrogates (\\ud800-\\udfff): send valid Unicode text") from None
    return bounded(value)


def text(*, strip: bool = False, min_length: int | None = None, max_length: int | None = None):
    """The type of a string a client sends: storable (PostgreSQL refuses NUL) and encodable as
    UTF-8 (a lone surrogate is not), checked first, then within these bounds (once stripped, with
    strip). Bounds belong here: stacked after the check, they would apply to the unstripped value."""
    bounds = StringConstraints(strip_whitespace=strip or None, min_length=min_length, max_length=max_length)
    return Annotated[str, bounds, WrapValidator(_storable)]


Text = text()

EXAMPLE_EMAIL = {
    "sender": "Dana Whitfield <dana@example.com>",
    "subject": "[NW-48213] Brake squeal after service",
    "body": "Hi, I picked up my bike on Saturday and the front brake squeals on every stop. Can I bring it back?",
}


class EmailIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_EMAIL]})

    sender: text(strip=True, min_length=1, max_length=320) = Field(description="The From of the incoming email")
    subject: text(strip=True, max_length=998) = ""
    body: text(strip=True, min_length=1) = Field(
        description="The incoming email's text; quoted history is trimmed to a bound"
    )


class DecodingOptions(BaseModel):
    """Per-request decoding settings; each defaults to the server's."""

    max_new_tokens: int | None = Field(None, ge=1, description="Defaults to the server's setting")
    repetition_penalty: float | None = Field(
        None, ge=1.0, le=2.0, description="As in transformers' generate: > 1 penalises tokens already seen"
    )
    no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=64, description="As in transformers' generate: no n-gram of this size occurs twice; 0: off"
    )

    def guard_overrides(self) -> dict:
        return {"repetition_penalty": self.repetition_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size}


class DraftRequest(EmailIn, DecodingOptions):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_EMAIL | {"max_new_tokens": 200}]})


class DraftBatchRequest(DecodingOptions):
    model_config = ConfigDict(json_schema_extra={"examples": [{"emails": [EXAMPLE_EMAIL], "max_new_tokens": 200}]})

    emails: list[EmailIn] = Field(min_length=1, max_length=32, description="Up to 32 emails, drafted together")


class CorrectionRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"verdict": "edited", "final_text": "Hi Dana,\n\nThanks for getting in touch ..."},
                {"verdict": "accepted"},
                {"verdict": "rejected", "reason": "Wrong shop policy"},
            ]
        }
    )

    verdict: Verdict
    final_text: text(max_length=50_000) | None = Field(None, description="Required for 'edited'")
    reason: text(max_length=2_000) | None = None


class CorrectionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    draft_id: int
    verdict: Verdict
    final_text: str | None
    reason: str | None
    reviewer: str
    split: Split
    created_at: datetime


class DraftOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    sender: str
    subject: str
    body: str
    draft_text: str
    base_model: str
    adapter_id: int | None
    backend: str = Field(description='What decoded it: "local" (this server) or "remote <url>"')
    generation: dict
    prompt_tokens: int
    tokens_generated: int
    finish_reason: str
    latency_ms: float
    created_at: datetime
    correction: CorrectionOut | None


class DraftPage(BaseModel):
    items: list[DraftOut]
    next_before_id: int | None = Field(description="Pass as before_id to get the next page; null at the end")


class ReviewQueueOut(BaseModel):
    pending: int = Field(description="Drafts of this tenant still waiting for a correction")
    items: list[DraftOut]


class KeyRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "support-inbox", "role": "agent"}]})

    name: text(strip=True, min_length=1, max_length=200)
    role: Role


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="The API key itself; shown this once, only its hash is stored")


ADAPTER_SCALE = (
    "The strength every version of the tenant's adapters is served at (it multiplies the adapter's update); "
    "null: each version at the scale chosen for it on its validation slice"
)


SHADOW_CORRECTIONS = (
    "A candidate that passes the gate drafts in shadow beside the champion (stored, never shown) until this many "
    "corrections are scored, then is promoted if its live chrF is better with a 95% paired interval, else rejected; "
    "null: it is promoted at once"
)


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    slug: str
    name: str
    instructions: str
    adapter_scale: float | None = Field(description=ADAPTER_SCALE)
    shadow_corrections: int | None = Field(description=SHADOW_CORRECTIONS)
    organization_id: int | None = Field(
        description="A team's organization: it drafts with the organization's champion until it has its own"
    )


class TenantUpdate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"instructions": "You answer for Northwind ..."},
                {"adapter_scale": 0.75},
                {"shadow_corrections": 30},
            ]
        }
    )

    name: text(strip=True, min_length=1, max_length=200) | None = None
    instructions: text(max_length=10_000) | None = Field(
        None, description="The system prompt for drafting; it must leave half of the prompt budget to the email"
    )
    adapter_scale: Annotated[float, Field(gt=0, le=MAX_ADAPTER_SCALE), AfterValidator(check_adapter_scale)] | None = (
        Field(None, description=f"{ADAPTER_SCALE}; at most two decimals; send null to clear it")
    )
    shadow_corrections: Annotated[int, Field(ge=shadow.MIN_CORRECTIONS, le=shadow.MAX_CORRECTIONS)] | None = Field(
        None, description=f"{SHADOW_CORRECTIONS}; send null to clear it (a shadow running then is rejected)"
    )


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


class RunRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{}, {"overrides": {"epochs": 2, "learning_rate": 1e-3}}]})

    overrides: TrainOverrides = Field(default_factory=TrainOverrides, description="Training settings for this run")


class CombineRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{}, {"organization_weight": 0.3, "team_weight": 0.7, "method": "linear"}]}
    )

    organization_version: Id | None = Field(None, description="The organization's version; default its champion")
    team_version: Id | None = Field(None, description="This team's version; default its champion")
    organization_weight: float = Field(0.5, gt=0, le=compose.MAX_WEIGHT)
    team_weight: float = Field(0.5, gt=0, le=compose.MAX_WEIGHT)
    method: compose.Method = Field(
        "cat",
        description="cat: exactly the weighted sum of the two updates (rank r1 + r2); linear: rank r, approximate",
    )


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    status: str = Field(description="queued | running | evaluating | promoted | shadowed | rejected | failed")
    trigger: str
    requested_by: str
    config: dict
    composition: dict | None = Field(description="Set when the run combined adapters instead of training one")
    step: int
    total_steps: int
    loss: float | None
    loss_history: list[dict]
    report: dict | None = Field(
        description="Held-out scores of base, champion and candidate; regression-set NLL of base and candidate; "
        "the gate's decision, with the forgetting guard's verdict (decision.forgetting)"
    )
    decision_reason: str | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    version: int
    status: str = Field(description="candidate | champion | shadow | rejected | retired")
    content_hash: str
    size_bytes: int
    base_model: str
    training_run_id: int | None
    config: dict
    scale: float = Field(description="The scale chosen on its validation slice; the tenant's adapter_scale wins")
    composition: dict | None = Field(description="A combined version: its method and parents with their weights")
    metrics: dict
    created_at: datetime
    promoted_at: datetime | None


class ShadowComparisonOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    shadow_version: int
    champion_version: int | None = Field(description="null: the bare base model")
    champion_inherited: bool = Field(description="The champion is the organization's: the team has none of its own")
    needed: int | None = Field(description="The tenant's shadow_corrections: scored corrections to decide on")
    drafts: int = Field(description="The shadow's drafts stored")
    scored: int = Field(description="Of them, scored against a correction's final text")
    champion_chrf: float | None
    shadow_chrf: float | None
    champion_edit_words: float | None
    shadow_edit_words: float | None
    difference: float | None = Field(description="Mean paired chrF difference, shadow minus champion")
    ci_low: float | None = Field(description="Its 95% paired bootstrap interval (from 2 scored corrections)")
    ci_high: float | None
    edit_difference: float | None = Field(description="Mean paired edit-words difference, shadow minus champion")
    edit_ci_low: float | None = Field(description="Its 95% paired bootstrap interval")
    edit_ci_high: float | None


class ShadowDecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    action: str = Field(description="promote | reject")
    to_adapter_id: int | None = Field(description="The shadow decided")
    reason: str
    scores: dict = Field(description="The comparison it was decided on, as `live`")
    created_at: datetime


class ShadowOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    live: ShadowComparisonOut | None = Field(description="The shadow drafting now against the champion; null: none")
    last_decision: ShadowDecisionOut | None = Field(description="The last shadow decided on its live scores")


class AuditReason(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "reviewers report worse drafts since v3"}]})

    reason: text(strip=True, min_length=1, max_length=2_000)
