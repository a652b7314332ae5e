import pytest
from fastapi.testclient import TestClient

from agent.base_model import load_base_model
from agent.drafting import Drafter
from api.app import create_app
from api.deps import drafter, get_db
from core.errors import Conflict
from core.settings import get_settings
from feedback.models import Role, Tenant
from tests.factories import make_key
from tests.training.helpers import FAST, start
from training import registry
from training.models import Adapter, AdapterStatus, RunStatus, TrainingRun
from training.pipeline import execute_run


def test_a_run_is_promoted_then_an_equal_candidate_is_rejected(sessions, tenant_with_corrections, run_settings):
    tenant, lines = tenant_with_corrections, []
    # Without a validation slice whatever ids the database hands out (they decide the held-out split)
    overrides = FAST | {"validation_fraction": 0}
    first = start(sessions, tenant, overrides)
    assert execute_run(first, run_settings, sessions=sessions, echo=lines.append) == RunStatus.promoted, lines
    with sessions() as session:
        run = session.get(TrainingRun, first)
        champion = registry.champion(session, tenant.id)
        assert champion.training_run_id == first and champion.train_snapshot_id == run.train_snapshot_id
        assert run.step == run.total_steps > 0 and len(run.loss_history) == run.total_steps
        summary = run.report["summary"]
        assert summary["candidate"]["nll"] < summary["base"]["nll"] and "champion" not in summary
        assert run.report["decision"]["promote"] and run.decision_reason.startswith("held-out NLL")
        assert champion.metrics["nll"] == summary["candidate"]["nll"]
        # No validation slice: served at the trained scaling
        assert run.report["training"]["selection"]["scale"] == champion.scale == run.report["scales"]["candidate"] == 1
        guard = run.report["decision"]["forgetting"]  # the forgetting guard passed it
        assert not guard["forgot"] and guard["change"] <= guard["margin"] == run_settings.forgetting_margin
        assert (summary["base"]["regression_nll"], summary["candidate"]["regression_nll"]) == pytest.approx(
            (guard["base_nll"], guard["candidate_nll"]), abs=1e-4
        )
    folder = run_settings.reports_dir / f"run-{first}"
    assert {p.name for p in folder.iterdir()} >= {"report.json", "loss.png", "heldout.png"}
    assert any("step" in line and "loss" in line for line in lines)

    # The same data and seed give the same adapter: no better than the champion, so rejected. The
    # tenant's scale wins over each version's: both are scored at it, as they would be served.
    with sessions() as session:
        session.get(Tenant, tenant.id).adapter_scale = 0.5
    second = start(sessions, tenant, overrides)
    assert execute_run(second, run_settings, sessions=sessions, echo=lines.append) == RunStatus.rejected
    with sessions() as session:
        run = session.get(TrainingRun, second)
        assert "margin" in run.decision_reason and set(run.report["summary"]) == {"base", "champion", "candidate"}
        assert run.report["scales"] == {"champion": 0.5, "candidate": 0.5}
        assert any(line.startswith("  candidate (scale 0.5): held-out NLL") for line in lines)
        assert run.report["summary"]["champion"]["nll"] != summary["candidate"]["nll"]  # the same weights, scaled
        assert "regression_nll" not in run.report["summary"]["champion"]  # the guard compares with the base
        assert registry.champion(session, tenant.id).id == champion.id
        candidate = session.query(Adapter).filter_by(training_run_id=second).one()
        assert candidate.status == AdapterStatus.rejected

    # A redelivered finished run does nothing.
    assert execute_run(first, run_settings, sessions=sessions, echo=lines.append) == RunStatus.promoted, lines


def test_a_failing_run_is_failed_visibly_and_the_champion_is_untouched(sessions, tenant_with_corrections, run_settings):
    tenant = tenant_with_corrections
    execute_run(start(sessions, tenant), run_settings, sessions=sessions, echo=lambda _: None)
    with sessions() as session:
        champion_id = registry.champion(session, tenant.id).id
    broken = start(sessions, tenant)
    no_model = run_settings.model_copy(update={"base_model": str(run_settings.var_dir / "no_such_model")})
    with pytest.raises(ValueError):
        execute_run(broken, no_model, sessions=sessions, echo=lambda _: None)
    with sessions() as session:
        run = session.get(TrainingRun, broken)
        assert run.status == RunStatus.failed and "no_such_model" in run.error and run.finished_at
        assert registry.champion(session, tenant.id).id == champion_id


def test_only_one_active_run_per_tenant(sessions, tenant_with_corrections):
    start(sessions, tenant_with_corrections)
    with pytest.raises(Conflict, match="already queued"):
        start(sessions, tenant_with_corrections)


def test_the_next_draft_uses_the_champion(sessions, tenant_with_corrections, run_settings):
    tenant = tenant_with_corrections
    execute_run(start(sessions, tenant), run_settings, sessions=sessions, echo=lambda _: None)
    with sessions() as session:
        _, raw_key = make_key(session, tenant, Role.agent)
        champion = registry.champion(session, tenant.id)

    app = create_app()

    def db():
        with sessions() as session:
            yield session

    app.dependency_overrides[get_db] = db
    # A model of its own: attaching an adapter changes the model object in place.
    app.dependency_overrides[drafter] = lambda: Drafter.local(load_base_model(run_settings), run_settings)
    app.dependency_overrides[get_settings] = lambda: run_settings
    email = {"sender": "Dana <d@example.com>", "subject": "Order", "body": "Where is order 7?", "max_new_tokens": 12}
    with TestClient(app) as client:
        response = client.post("/v1/drafts", json=email, headers={"X-API-Key": raw_key})
    assert response.status_code == 201, response.text
    assert response.json()["adapter_id"] == champion.id


def test_a_candidate_of_a_tenant_with_shadow_corrections_goes_into_shadow(
    sessions, tenant_with_corrections, run_settings
):
    tenant, lines = tenant_with_corrections, []
    with sessions() as session:
        session.get(Tenant, tenant.id).shadow_corrections = 5
    run_id = start(sessions, tenant)
    assert execute_run(run_id, run_settings, sessions=sessions, echo=lines.append) == RunStatus.shadowed, lines
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert run.decision_reason.startswith("held-out NLL") and run.decision_reason.endswith("for 5 corrections")
        assert registry.champion(session, tenant.id) is None  # unchanged: the base model still drafts
        candidate = registry.shadow(session, tenant.id)
        assert candidate.training_run_id == run_id and candidate.metrics["run_id"] == run_id
