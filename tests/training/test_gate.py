import numpy as np

from training.evaluate import decide

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
