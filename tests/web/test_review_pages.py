"""The review pages in a real browser: sign in, correct drafts, tenants kept apart, CSRF, sign out."""

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from sqlalchemy import select

from feedback.models import ApiKey, Correction, Verdict, utcnow
from tests.web.samples import EMAILS


def correction(committed, draft_id: int) -> Correction | None:
    with committed() as session:
        return session.scalar(select(Correction).where(Correction.draft_id == draft_id))


def press(browser, *keys: str) -> None:
    """Hold the modifiers, press the last key, release."""
    *modifiers, key = keys
    actions = ActionChains(browser.driver)
    for modifier in modifiers:
        actions.key_down(modifier)
    actions.send_keys(key)
    for modifier in reversed(modifiers):
        actions.key_up(modifier)
    actions.perform()


def test_reviewer_edits_a_draft_and_lands_on_the_next(browser, shop, committed):
    browser.sign_in(shop.reviewer)
    assert "3 drafts waiting for review" in browser.text()
    rows = browser.find_all("table.queue tbody tr")
    assert [row.find_element("css selector", "a").text for row in rows] == [f"#{i}" for i in shop.draft_ids]
    browser.screenshot("queue")

    browser.find("a.button.primary").click()
    first = shop.draft_ids[0]
    browser.wait_for_path(f"/web/drafts/{first}")
    assert EMAILS[0][2].splitlines()[2] in browser.text()  # the incoming email is shown
    editor = browser.find("#final_text")
    assert editor.get_attribute("value") == EMAILS[0][3]  # prefilled with the draft
    browser.screenshot("draft")
    browser.screenshot("draft-phone", width=390)

    final = EMAILS[0][3].replace("we will look at it.", "we will fix it free of charge, ticket NW-48213.")
    editor.clear()
    editor.send_keys(final)
    browser.find("#reason").send_keys("house style: cite the ticket")
    browser.find('button[value="edit"]').click()
    browser.wait_for_path(f"/web/drafts/{shop.draft_ids[1]}")

    stored = correction(committed, first)
    assert (stored.verdict, stored.final_text, stored.reason) == (Verdict.edited, final, "house style: cite the ticket")
    assert stored.reviewer == "Marta"
    saved = browser.find("section.saved")
    assert f"draft #{first}, edited" in saved.text
    assert [e.text for e in saved.find_elements("css selector", ".diff del")] == ["look at it."]
    assert [e.text for e in saved.find_elements("css selector", ".diff ins")] == [
        "fix it free of charge, ticket NW-48213."
    ]
    assert "2 pending" in browser.text()
    browser.screenshot("saved-diff")

    saved.find_element("css selector", "a").click()  # a corrected draft shows its correction, not the editor
    browser.wait_for_path(f"/web/drafts/{first}")
    assert "Edited by Marta" in browser.text("section:has(#correction-heading)")
    assert not browser.find_all("#correction")


def test_keyboard_accepts_rejects_and_saves_until_the_queue_is_clear(browser, shop, committed):
    first, second, third = shop.draft_ids
    browser.sign_in(shop.reviewer)
    browser.open(f"/web/drafts/{first}")
    press(browser, "j")  # next pending draft, then back
    browser.wait_for_path(f"/web/drafts/{second}")
    press(browser, "k")
    browser.wait_for_path(f"/web/drafts/{first}")

    press(browser, Keys.ALT, "a")
    browser.wait_for_path(f"/web/drafts/{second}")
    stored = correction(committed, first)
    assert (stored.verdict, stored.final_text) == (Verdict.accepted, EMAILS[0][3])

    browser.find("#reason").send_keys("we do not swap tyres by mail")
    press(browser, Keys.ALT, "r")
    browser.wait_for_path(f"/web/drafts/{third}")
    stored = correction(committed, second)
    assert (stored.verdict, stored.final_text, stored.reason) == (
        Verdict.rejected,
        None,
        "we do not swap tyres by mail",
    )

    editor = browser.find("#final_text")
    editor.send_keys(Keys.END, "\nSee you soon!")
    press(browser, Keys.CONTROL, Keys.ENTER)
    browser.wait_for_path("/web/queue")
    stored = correction(committed, third)
    assert (stored.verdict, stored.final_text) == (Verdict.edited, EMAILS[2][3] + "\nSee you soon!")
    assert "The queue is clear" in browser.text()
    assert "Nothing to review" in browser.text()


def test_a_reviewer_cannot_open_or_correct_another_tenants_draft(browser, shops, committed):
    mine, theirs = shops
    browser.sign_in(mine.reviewer)
    browser.open(f"/web/drafts/{theirs.draft_ids[0]}")
    assert browser.text("h1").startswith("Not found")
    assert f"No draft {theirs.draft_ids[0]}." in browser.text()

    # A form of my own, pointed at their draft, is refused the same way and stores nothing.
    browser.open(f"/web/drafts/{mine.draft_ids[0]}")
    browser.driver.execute_script(
        "document.getElementById('correction').action = arguments[0]", f"/web/drafts/{theirs.draft_ids[0]}"
    )
    browser.submit('button[value="accept"]')
    browser.wait(lambda d: "Not found" in d.find_element("css selector", "h1").text)
    assert correction(committed, theirs.draft_ids[0]) is None
    assert correction(committed, mine.draft_ids[0]) is None


def test_a_form_without_the_csrf_token_is_refused(browser, shop, committed):
    draft_id = shop.draft_ids[0]
    browser.sign_in(shop.reviewer)
    browser.open(f"/web/drafts/{draft_id}")
    browser.driver.execute_script("document.querySelector('#correction input[name=csrf_token]').remove()")
    browser.submit('button[value="accept"]')
    browser.wait(lambda d: "Not allowed" in d.find_element("css selector", "h1").text)
    assert "security token is missing or out of date" in browser.text()
    assert correction(committed, draft_id) is None

    browser.open(f"/web/drafts/{draft_id}")  # a forged token fares no better
    browser.driver.execute_script("document.querySelector('#correction input[name=csrf_token]').value = 'forged'")
    browser.submit('button[value="accept"]')
    browser.wait(lambda d: "Not allowed" in d.find_element("css selector", "h1").text)
    assert correction(committed, draft_id) is None


def test_sign_out_and_a_revoked_key_end_the_session(browser, shop, committed):
    browser.sign_in(shop.reviewer)
    browser.find(".who button").click()
    browser.wait_for_path("/web/signin")
    assert "You are signed out." in browser.text()
    browser.open("/web/queue")
    browser.wait_for_path("/web/signin")
    assert "Sign in with your reviewer or admin key." in browser.text()

    browser.sign_in(shop.reviewer)
    with committed() as session:
        session.get(ApiKey, shop.reviewer_key_id).revoked_at = utcnow()
        session.commit()
    browser.open(f"/web/drafts/{shop.draft_ids[0]}")
    browser.wait_for_path("/web/signin")
    assert "unknown or revoked" in browser.text()


def test_sign_in_refuses_unknown_and_agent_keys(browser, shop):
    browser.open("/web/signin")
    browser.find("#api_key").send_keys("dl_not-a-key")
    browser.submit("form button[type=submit]")
    browser.wait(lambda d: "unknown or revoked" in d.find_element("css selector", "main").text)
    browser.find("#api_key").send_keys(shop.agent)
    browser.submit("form button[type=submit]")
    browser.wait(lambda d: "agent key cannot sign in" in d.find_element("css selector", "main").text)
    assert browser.driver.current_url.endswith("/web/signin")
