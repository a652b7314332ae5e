"""The admin's dashboard in a real browser: versions and scores, the last run, promote and roll back
with confirmation, trigger a run; reviewers are kept out."""

import pytest
from sqlalchemy import select

from core.db import committing
from core.settings import get_settings
from feedback.models import Tenant, utcnow
from tests.factories import make_draft
from training import registry
from training.models import Adapter, AdapterEvent, AdapterStatus, RunStatus, ShadowDraft, TrainingRun


def champion_version(committed, tenant_id: int) -> int | None:
    with committed() as session:
        current = registry.champion(session, tenant_id)
        return current.version if current else None


def submit_confirmed(browser, button_css: str, accept: bool) -> None:
    """Click a button whose form asks for confirmation, and answer the dialog."""
    browser.find(button_css).click()
    alert = browser.wait(lambda d: d.switch_to.alert)
    alert.accept() if accept else alert.dismiss()


def test_dashboard_shows_versions_scores_run_and_review_stats(browser, versions, committed):
    browser.sign_in(versions.shop.admin)
    browser.find('a[href$="/web/dashboard"]').click()
    browser.wait_for_path("/web/dashboard")

    assert "Version 2" in browser.text("#champion-heading + p")
    points = browser.find_all("figure.chart circle")
    assert len(points) == 3
    assert browser.find(".chart .status-champion text").text == "v2"
    run = browser.text("section:has(#run-heading)")
    assert f"Run {versions.run_id}: rejected" in run
    assert "The gate: improvement not significant" in run
    assert browser.find("#run-progress").get_attribute("value") == "12"
    scores = browser.text("table.scores")
    assert "32 drafted" in scores and "candidate 1.790 38.9 15% 75% 50%" in scores  # loops, opening, closing

    rows = {
        row.find_element("css selector", "th").text: row.text for row in browser.find_all("table.versions tbody tr")
    }
    assert rows["v1"].split()[-4:] == ["2", "2", "50%", "0.5"]  # drafts, reviewed, accepted unedited, mean edit
    assert rows["v1"].split()[-6:-4] == ["25%", "50%"]  # held-out drafts that loop, house style
    assert rows["v2"].split()[-4:] == ["2", "2", "100%", "0.0"]
    assert rows["base model"].split()[-4:] == ["3", "0", "–", "–"]
    browser.screenshot("dashboard")
    browser.screenshot("dashboard-phone", width=390)


def test_promote_and_roll_back_ask_for_confirmation(browser, versions, committed):
    tenant_id = versions.shop.tenant_id
    browser.sign_in(versions.shop.admin)
    browser.open("/web/dashboard")
    browser.find("#promote-version option[value='1']").click()
    browser.find("#promote-reason").send_keys("v2 drafts the wrong opening hours")

    submit_confirmed(browser, "form.promote button", accept=False)
    assert champion_version(committed, tenant_id) == 2

    submit_confirmed(browser, "form.promote button", accept=True)
    browser.wait(lambda d: "Version 1 is the champion now." in d.find_element("css selector", "main").text)
    assert champion_version(committed, tenant_id) == 1

    browser.find("#rollback-reason").send_keys("v1 was worse after all")
    submit_confirmed(browser, "form:has(#rollback-reason) button", accept=True)
    browser.wait(lambda d: "Rolled back: version 2 is the champion." in d.find_element("css selector", "main").text)
    assert champion_version(committed, tenant_id) == 2
    with committed() as session:
        events = session.scalars(
            select(AdapterEvent).where(AdapterEvent.tenant_id == tenant_id, AdapterEvent.actor == "Ops")
        ).all()
    assert [(e.action, e.reason) for e in events] == [
        ("promote", "v2 drafts the wrong opening hours"),
        ("rollback", "v1 was worse after all"),
    ]


def test_the_run_shows_what_preference_training_did(browser, versions, committed):
    with committed() as session:
        run = session.get(TrainingRun, versions.run_id)
        stage = {
            "stage": "after_sft",
            "pairs": 61,
            "steps": 16,
            "reference": "sft",
            "beta": 0.1,
            "validation_nll": 2.31,
        }
        run.report = run.report | {"training": {"selection": {"preference": stage}}}
        session.commit()
    browser.sign_in(versions.shop.admin)
    browser.open("/web/dashboard")
    shown = browser.text("#preference-training")
    assert "Preference training (after sft): 16 DPO steps on 61 pairs" in shown
    assert "reference sft, beta 0.1; validation NLL after it 2.310" in shown


def train_now(browser, committed, tenant_id: int, preference: str, reference: str = "") -> TrainingRun:
    """Choose on the dashboard, press Train now and confirm; the run it queued."""
    browser.open("/web/dashboard")
    browser.find(f"#preference option[value='{preference}']").click()
    browser.find(f"#reference option[value='{reference}']").click()
    submit_confirmed(browser, "form:has(button.primary) button.primary", accept=True)
    browser.wait(lambda d: "is queued" in d.find_element("css selector", "main").text)
    with committed() as session:
        return session.scalars(
            select(TrainingRun).where(TrainingRun.tenant_id == tenant_id).order_by(TrainingRun.id.desc())
        ).first()


def test_train_now_queues_a_run(browser, versions, committed):
    browser.sign_in(versions.shop.admin)
    run = train_now(browser, committed, versions.shop.tenant_id, "after_sft")
    assert (run.status, run.trigger, run.requested_by) == (RunStatus.queued, "web", "Ops")
    assert run.config["preference"] == "after_sft"  # the choice on the page, the defaults for the rest
    assert run.config["preference_reference"] == "sft"
    assert f"Run {run.id}: queued" in browser.text("section:has(#run-heading)")
    assert not browser.find("form:has(button.primary) button.primary").is_enabled()  # one active run at a time


@pytest.mark.parametrize(("reference", "expected"), [("", "base"), ("champion", "champion")])
def test_preference_training_alone_refers_to_the_base_unless_the_champion_is_chosen(
    browser, versions, committed, reference, expected
):
    """There is no SFT adapter to refer to: the default reference alone is the frozen base."""
    browser.sign_in(versions.shop.admin)
    run = train_now(browser, committed, versions.shop.tenant_id, "alone", reference)
    assert (run.config["preference"], run.config["preference_reference"]) == ("alone", expected)


def test_a_reviewer_cannot_open_the_dashboard(browser, shop):
    browser.sign_in(shop.reviewer)
    assert not browser.find_all('a[href$="/web/dashboard"]')
    browser.open("/web/dashboard")
    assert browser.text("h1").startswith("Not allowed")
    assert "needs an admin key" in browser.text()


def test_dashboard_shows_the_shadow_s_live_comparison_and_sets_its_corrections(browser, versions, committed):
    """v3 in shadow against the champion v2 with two scored corrections; then the setting cleared."""
    tenant_id = versions.shop.tenant_id
    with committed() as session, committing(session):
        session.get(Tenant, tenant_id).shadow_corrections = 5
        candidate = session.get(Adapter, versions.adapter_ids[3])
        registry.start_shadow(session, get_settings(), candidate, actor="gate", reason="passed")
        tenant = session.get(Tenant, tenant_id)
        for champion_chrf, shadow_chrf, edits in [(40.0, 50.0, 3), (30.0, 36.0, 1)]:
            draft = make_draft(session, tenant, "Hi Sam.", adapter_id=versions.adapter_ids[2])
            session.add(
                ShadowDraft(
                    draft_id=draft.id,
                    adapter_id=candidate.id,
                    text="Hello Sam.",
                    finish_reason="stop",
                    tokens_generated=4,
                    champion_chrf=champion_chrf,
                    shadow_chrf=shadow_chrf,
                    champion_edit_words=edits,
                    shadow_edit_words=0,
                    scored_at=utcnow(),
                )
            )
    browser.sign_in(versions.shop.admin)
    browser.open("/web/dashboard")
    panel = browser.text("#shadow")
    assert "Version 3 in shadow against version 2" in panel
    assert "2 of 5 corrections scored (2 shadow drafts" in browser.text("#shadow-progress")
    assert browser.text("table.shadow-scores").splitlines()[-2:] == ["champion 35.0 2.0", "shadow 43.0 0.0"]
    assert browser.text("#shadow-difference").startswith(
        "Mean chrF difference (shadow − champion) +8.00, 95% CI [+6.00"
    )
    assert browser.find("#shadow-corrections").get_attribute("value") == "5"
    browser.screenshot("dashboard-shadow")

    browser.find("#shadow-corrections").clear()
    browser.submit("form.shadow-corrections button")
    browser.wait(lambda d: "promoted at once now" in d.find_element("css selector", "main").text)
    assert "No version is in shadow." in browser.text("#shadow")
    assert "shadow drafting was turned off by Ops" not in browser.text("#shadow")  # not a decision on scores
    with committed() as session:
        assert session.get(Tenant, tenant_id).shadow_corrections is None
        assert session.get(Adapter, versions.adapter_ids[3]).status == AdapterStatus.rejected


def test_a_team_sees_its_organization_s_champion_and_combined_versions(browser, versions, shops, committed):
    parents = [
        {"role": "organization", "tenant_id": 0, "adapter_id": 0, "version": 4, "weight": 0.25, "scale": 1.0},
        {"role": "team", "tenant_id": 0, "adapter_id": 0, "version": 1, "weight": 1.0, "scale": 1.0},
    ]
    with committed() as session:
        composition = {"method": "cat", "parents": parents}
        session.get(TrainingRun, versions.run_id).composition = composition
        session.get(Adapter, versions.adapter_ids[3]).composition = composition
        session.get(Tenant, shops[1].tenant_id).organization_id = versions.shop.tenant_id
        session.commit()
    browser.sign_in(versions.shop.admin)
    browser.open("/web/dashboard")
    assert "Combination (cat): 0.25 × organization v4 + 1 × team v1" in browser.text("#composition")
    combined = browser.find("table.versions tbody tr:first-child th .hint")
    assert combined.text == "combined"
    assert combined.get_attribute("title") == "0.25 × organization v4 + 1 × team v1 (cat)"

    browser.driver.delete_all_cookies()  # signed out
    browser.sign_in(shops[1].admin)
    browser.open("/web/dashboard")
    assert "its organization Northwind Cycles's champion, version 2" in browser.text("#inherited-champion")
