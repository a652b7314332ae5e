"""Word diffs, and how reviewers treated each adapter's drafts."""

import time

from feedback import service
from feedback.diff import DiffPart, word_diff, word_edit_distance
from feedback.models import Role, Verdict
from tests.factories import make_correction, make_draft, make_key, make_tenant


def test_word_diff_marks_changed_words_and_keeps_the_final_layout():
    before = "Hello Dana,\n\nwe will look at it.\n\nRegards"
    after = "Hello Dana,\n\nwe will fix it today.\n\nRegards"
    assert word_diff(before, after) == [
        DiffPart("equal", "Hello Dana,\n\nwe will "),
        DiffPart("delete", "look at it."),
        DiffPart("equal", " "),
        DiffPart("insert", "fix it today.\n\n"),
        DiffPart("equal", "Regards"),
    ]


def test_word_diff_reads_back_as_either_text():
    before = "Hi Sam, the order ships Monday. Thanks for waiting!"
    after = "Hi Sam,\nyour order ships today. Thanks!"
    parts = word_diff(before, after)
    assert "".join(p.text for p in parts if p.op != "delete").split() == after.split()
    assert "".join(p.text for p in parts if p.op != "insert").split() == before.split()


def test_word_edit_distance_counts_words_not_whitespace():
    assert word_edit_distance("a b c d", "a b c d") == 0
    assert word_edit_distance("a  b\nc d", "a b c\n\nd") == 0
    assert word_edit_distance("a b c d", "a x c d e") == 2  # one substitution, one insertion
    assert word_edit_distance("a b c d", "z") == 4
    assert word_edit_distance("", "one two") == 2


def test_review_stats_by_adapter(session):
    tenant, other = make_tenant(session), make_tenant(session)
    key, _ = make_key(session, tenant, Role.reviewer)

    def reviewed(adapter_id, verdict, final_text=None):
        draft = make_draft(session, tenant, "a b c d", adapter_id=adapter_id)
        if verdict is not None:
            make_correction(session, draft, key, verdict, final_text)

    reviewed(None, None)
    reviewed(101, Verdict.accepted)
    reviewed(101, Verdict.edited, "a x c d e")  # 2 word edits
    reviewed(101, Verdict.rejected)  # nothing to compare: left out of the mean
    reviewed(101, Verdict.rejected, "z")  # 4 word edits
    reviewed(102, None)
    make_draft(session, other, "not this tenant's", adapter_id=101)

    stats = service.review_stats_by_adapter(session, tenant.id)
    assert set(stats) == {None, 101, 102}
    v101 = stats[101]
    assert (v101.drafts, v101.reviewed, v101.accepted, v101.edited, v101.rejected) == (4, 4, 1, 1, 2)
    assert v101.accepted_share == 0.25
    assert v101.mean_edit_words == 2.0  # (0 + 2 + 4) / 3
    assert (stats[102].drafts, stats[102].reviewed, stats[102].accepted_share, stats[102].mean_edit_words) == (
        1,
        0,
        None,
        None,
    )
    assert stats[None].drafts == 1
    assert service.review_stats_by_adapter(session, make_tenant(session).id) == {}


def test_pending_neighbours_follow_the_queue_order(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant, Role.reviewer)
    first, second, third, fourth = (make_draft(session, tenant, f"draft {n}") for n in range(4))
    make_correction(session, second, key, Verdict.accepted)
    assert service.pending_neighbours(session, first) == (None, third)
    assert service.pending_neighbours(session, second) == (first, third)  # a corrected draft still has a place
    assert service.pending_neighbours(session, fourth) == (third, None)


# A reviewer's text of 50,000 characters of two short words against a long draft of one of them:
# difflib's matcher on it, unbounded, ran for minutes.
PATHOLOGICAL_DRAFT, PATHOLOGICAL_FINAL = "a " * 1000, ("a b " * 12_500)[:50_000]


def test_the_word_diff_is_bounded_and_still_reads_back_as_either_text():
    started = time.perf_counter()
    parts = word_diff(PATHOLOGICAL_DRAFT, PATHOLOGICAL_FINAL)
    distance = word_edit_distance(PATHOLOGICAL_DRAFT, PATHOLOGICAL_FINAL)
    assert time.perf_counter() - started < 1
    assert "".join(p.text for p in parts if p.op != "delete").split() == PATHOLOGICAL_FINAL.split()
    assert "".join(p.text for p in parts if p.op != "insert").split() == PATHOLOGICAL_DRAFT.split()
    assert distance == 24_999  # the cheap bound: the common first word kept, the rest replaced
    ordinary = " ".join(f"word{i % 400}" for i in range(4000))
    assert word_edit_distance(ordinary, ordinary.replace("word7 ", "seven ")) == 10  # long, still exact


def test_a_correction_stores_its_edit_count_when_written(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant, Role.reviewer)
    counts = [
        make_correction(session, make_draft(session, tenant, "a b c d"), key, verdict, text).edit_words
        for verdict, text in [(Verdict.accepted, None), (Verdict.edited, "a x c d e"), (Verdict.rejected, None)]
    ]
    assert counts == [0, 2, None]

    started = time.perf_counter()
    draft = make_draft(session, tenant, PATHOLOGICAL_DRAFT)
    assert make_correction(session, draft, key, Verdict.edited, PATHOLOGICAL_FINAL).edit_words == 24_999
    assert time.perf_counter() - started < 1


def test_review_stats_read_the_stored_edit_counts(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant, Role.reviewer)
    edited = make_correction(session, make_draft(session, tenant, "a b c d", adapter_id=7), key, Verdict.edited, "a")
    make_correction(session, make_draft(session, tenant, "a b", adapter_id=7), key, Verdict.accepted)
    edited.edit_words = 40  # not what the texts give (3): the stats must not diff them again
    session.flush()
    assert service.review_stats_by_adapter(session, tenant.id)[7].mean_edit_words == 20.0
