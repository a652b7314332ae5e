"""The `draftloop eval` report: the bare base model and a tenant's champion scored on the
tenant's current held-out set and on the regression set, and the held-out NLL every adapter
version had when its run evaluated it, as a plot."""

from agent.adapters import attach
from agent.base_model import load_base_model
from core.db import Sessions, session_scope
from core.errors import Conflict
from core.settings import Settings
from feedback.models import Split
from feedback.service import get_tenant_by_slug
from training import plots, registry
from training.dataset import tenant_dataset
from training.evaluate import example_nll, forgetting, mean
from training.regression_set import regression_rows
from training.run_context import Echo


def evaluate_tenant(slug: str, settings: Settings, *, sessions: Sessions = session_scope, echo: Echo = print) -> dict:
    """Score the bare base model and the tenant's champion on the current held-out set, and plot
    the held-out NLL every adapter version had when its run evaluated it."""
    loaded = load_base_model(settings)
    with sessions() as session:
        tenant = get_tenant_by_slug(session, slug)
        heldout = tenant_dataset(session, tenant, Split.heldout, loaded.tokenizer, settings)
        current = registry.drafting_adapter(session, tenant.id)  # a team's may be its organization's
        ref = registry.serving_ref(session, settings, current, loaded.fingerprint) if current else None
        versions = [
            {"label": f"v{a.version}", "nll": a.metrics["nll"], "status": a.status}
            for a in registry.list_adapters(session, tenant.id)
            if "nll" in a.metrics
        ]
    if not heldout.rows:
        raise Conflict("this tenant has no held-out corrections yet")
    general = regression_rows(loaded.tokenizer, settings)
    scores, regression, model = {}, {}, loaded.model
    for name in ["base", *([f"champion v{current.version}"] if ref else [])]:
        if name != "base":  # after the base is scored: attaching changes the model in place
            model = attach(model, ref)
        scores[name] = mean(example_nll(model, loaded.tokenizer, heldout.rows))
        regression[name] = example_nll(model, loaded.tokenizer, general)
        at = f", scale {ref.scale:g}" if name != "base" else ""
        echo(
            f"{name}: held-out NLL {scores[name]:.3f} on {len(heldout.rows)} examples "
            f"(snapshot {heldout.content_hash[:12]}{at}); regression-set NLL {mean(regression[name]):.3f} "
            f"on {len(general)} general emails"
        )
    if ref is not None:
        guard = forgetting(regression["base"], regression[f"champion v{current.version}"], settings.forgetting_margin)
        echo(f"forgetting guard on champion v{current.version}: {guard.verdict}")
    path = settings.reports_dir / f"{slug}-versions.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    points = [{"label": "base", "nll": scores["base"], "status": "retired"}, *versions]
    plots.versions_over_time(points, path, f"{slug}: held-out NLL per adapter version")
    echo(f"plot of every version: {path}")
    return scores
