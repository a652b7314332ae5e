"""Word diffs, and how reviewers treated each adapter's drafts."""

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
