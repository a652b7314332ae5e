import numpy as np

from training.evaluate import decide, style_match

RNG = np.random.default_rng(0)
CHAMPION = list(2.0 + RNG.normal(0, 0.2, 40))


def test_a_clearly_better_candidate_is_promoted():
    decision = decide(CHAMPION, [x - 0.5 for x in CHAMPION], margin=0.02, min_examples=10)
    assert decision.promote and decision.ci_low > 0 and abs(decision.relative_improvement - 0.25) < 0.01


def test_an_equal_or_worse_candidate_is_rejected():
    assert not decide(CHAMPION, CHAMPION, margin=0.02, min_examples=10).promote
    worse = decide(CHAMPION, [x + 0.3 for x in CHAMPION], margin=0.02, min_examples=10)
    assert not worse.promote and "below the 2.0% margin" in worse.reason


def test_an_improvement_within_noise_is_rejected():
    noisy = [x - 0.05 + (1.0 if i % 2 else -1.0) for i, x in enumerate(CHAMPION)]  # better on average, by luck
    decision = decide(CHAMPION, noisy, margin=0.0, min_examples=10)
    assert not decision.promote and decision.ci_low <= 0 and "includes zero" in decision.reason


def test_too_few_heldout_examples_is_rejected():
    decision = decide(CHAMPION[:5], [x - 1 for x in CHAMPION[:5]], margin=0.02, min_examples=10)
    assert not decision.promote and "at least 10" in decision.reason
    assert not decide([], [], margin=0.02, min_examples=10).promote


def test_a_candidate_whose_drafts_loop_more_is_rejected_despite_a_better_nll():
    better = [x - 0.5 for x in CHAMPION]
    decision = decide(CHAMPION, better, margin=0.02, min_examples=10, champion_loops=1, candidate_loops=3)
    assert not decision.promote and decision.ci_low > 0
    assert "3 of its held-out drafts loop against the champion's 1" in decision.reason
    assert decide(CHAMPION, better, margin=0.02, min_examples=10, champion_loops=3, candidate_loops=3).promote


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
