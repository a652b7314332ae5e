import re

import numpy as np
import pytest

from training.evaluate import decide, style_match

RNG = np.random.default_rng(0)
CHAMPION = list(2.0 + RNG.normal(0, 0.2, 40))
GENERAL = list(2.6 + RNG.normal(0, 0.3, 33))  # the base model's NLL on the regression set's emails
KEPT = {"base_regression_nll": GENERAL, "candidate_regression_nll": GENERAL, "forgetting_margin": 0.10}


def test_a_clearly_better_candidate_is_promoted():
    decision = decide(CHAMPION, [x - 0.5 for x in CHAMPION], margin=0.02, min_examples=10, **KEPT)
    assert decision.promote and decision.ci_low > 0 and abs(decision.relative_improvement - 0.25) < 0.01


def test_an_equal_or_worse_candidate_is_rejected():
    assert not decide(CHAMPION, CHAMPION, margin=0.02, min_examples=10, **KEPT).promote
    worse = decide(CHAMPION, [x + 0.3 for x in CHAMPION], margin=0.02, min_examples=10, **KEPT)
    assert not worse.promote and "below the 2.0% margin" in worse.reason


def test_an_improvement_within_noise_is_rejected():
    noisy = [x - 0.05 + (1.0 if i % 2 else -1.0) for i, x in enumerate(CHAMPION)]  # better on average, by luck
    decision = decide(CHAMPION, noisy, margin=0.0, min_examples=10, **KEPT)
    assert not decision.promote and decision.ci_low <= 0 and "includes zero" in decision.reason


def test_too_few_heldout_examples_is_rejected():
    decision = decide(CHAMPION[:5], [x - 1 for x in CHAMPION[:5]], margin=0.02, min_examples=10, **KEPT)
    assert not decision.promote and "at least 10" in decision.reason
    assert not decide([], [], margin=0.02, min_examples=10, **KEPT).promote


def test_a_candidate_whose_drafts_loop_more_is_rejected_despite_a_better_nll():
    better = [x - 0.5 for x in CHAMPION]
    decision = decide(CHAMPION, better, margin=0.02, min_examples=10, **KEPT, champion_loops=1, candidate_loops=3)
    assert not decision.promote and decision.ci_low > 0
    assert "3 of its held-out drafts loop against the champion's 1" in decision.reason
    assert decide(CHAMPION, better, margin=0.02, min_examples=10, **KEPT, champion_loops=3, candidate_loops=3).promote


def gate_with_general(candidate_general: list[float]):
    """A candidate clearly better on the held-out set, with this NLL on the regression set."""
    better = [x - 0.5 for x in CHAMPION]
    return decide(
        CHAMPION,
        better,
        margin=0.02,
        min_examples=10,
        base_regression_nll=GENERAL,
        candidate_regression_nll=candidate_general,
        forgetting_margin=0.10,
    )


def test_a_candidate_that_forgot_general_writing_is_rejected_despite_a_better_nll():
    decision = gate_with_general([x * 1.12 for x in GENERAL])  # 12% worse than the base on general emails
    guard = decision.forgetting
    assert not decision.promote and decision.ci_low > 0 and decision.relative_improvement > 0.2
    assert guard.forgot and guard.change == pytest.approx(0.12) and guard.base_nll == pytest.approx(np.mean(GENERAL))
    parsed = re.fullmatch(
        r"held-out NLL improved by [\d.]+%, but it forgot general writing: regression-set NLL ([\d.]+) "
        r"vs the base model's ([\d.]+) \(\+([\d.]+)%, more than the 10\.0% margin\)",
        decision.reason,
    )
    assert parsed, decision.reason
    assert [float(g) for g in parsed.groups()] == [round(guard.candidate_nll, 3), round(guard.base_nll, 3), 12.0]


def test_a_candidate_within_the_forgetting_margin_passes_the_guard():
    for factor in (1.08, 1.0, 0.9):  # a little worse, the same, better than the base on general emails
        decision = gate_with_general([x * factor for x in GENERAL])
        assert decision.promote and not decision.forgetting.forgot, decision.reason
        assert decision.forgetting.change == pytest.approx(factor - 1)
        assert decision.forgetting.verdict.endswith("within the 10.0% margin)")


def test_style_fidelity_masks_names_and_numbers_the_email_brings():
    email = "From: Callum Reid <callum@example.com>\nSubject: [NW-89670] order 204517\n\nWhere is my helmet?"
    reference = "Hi Callum,\n\nThanks for your email about NW-89670.\n\nRide safe,\nMarta\nNorthwind Cycles"
    same_style = "Hi Callum,\n\nIt ships on Monday.\n\nRide safe,\nMarta\nNorthwind Cycles"
    assert style_match(same_style, reference, email) == {"opening": True, "closing": True}
    other = "Hello Reid!\n\nIt ships on Monday.\n\nThanks,\nMarta\nNorthwind Cycles"
    assert style_match(other, reference, email) == {"opening": False, "closing": False}
    unnamed = "Hi Marta,\n\nIt ships.\n\nRide safe,\nMarta\nNorthwind Cycles"  # a name the email does not bring
    assert style_match(unnamed, reference, email)["opening"] is False
    numbers = style_match("Order 5 is fine.\nJeff", "Order 204517 is fine, sorry.\nJeff", email)
    assert numbers == {"opening": True, "closing": True}
