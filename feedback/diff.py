"""Word-level differences between a draft and the reviewer's final text.

The diff is computed on words (whitespace-separated), so a changed line break or a doubled
space is not an edit; each word keeps the whitespace after it for display. The edit distance
is read off the same diff: the number of words inserted, deleted or substituted.

The diff is difflib's SequenceMatcher over the words. Its work grows with the matching word
pairs times the matching blocks: a long text of a few short words repeated against a long
draft took seconds to minutes. So it runs on a budget of MAX_MATCHER_STEPS inner steps, counted
(never undercounted) before each search; 2 million steps took 0.1 to 0.5 s on 2 shared CPU
cores, while ordinary texts of 4,000 words on each side take about 1.2 million.
Over budget, the diff is a cheap bound instead: the common leading and trailing words are
kept and everything between them counts as replaced, so the distance is the larger of the two
middles' word counts, never less than the exact count."""

import re
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import accumulate
from typing import Literal

_WORD = re.compile(r"\S+\s*")
MAX_MATCHER_STEPS = 2_000_000


@dataclass(frozen=True)
class DiffPart:
    op: Literal["equal", "delete", "insert"]
    text: str


class _OverBudget(Exception):
    pass


class _BoundedMatcher(SequenceMatcher):
    """difflib's matcher over two word lists that gives up (_OverBudget) once its searches may
    have taken more than MAX_MATCHER_STEPS steps. Each search for the longest match in
    old[alo:ahi] scans those words and each one's positions in new: the count adds exactly that
    (prefix sums over old), an upper bound of the search's inner steps, before it runs."""

    def __init__(self, old: list[str], new: list[str]) -> None:
        # autojunk off: long replies repeat common words, which must still be matched exactly
        super().__init__(None, old, new, autojunk=False)
        in_new = Counter(new)
        self._scan_before = list(accumulate((1 + in_new[word] for word in old), initial=0))
        self._steps = 0

    def find_longest_match(self, alo: int, ahi: int, blo: int, bhi: int):
        self._steps += self._scan_before[ahi] - self._scan_before[alo]
        if self._steps > MAX_MATCHER_STEPS:
            raise _OverBudget
        return super().find_longest_match(alo, ahi, blo, bhi)


def _common_prefix_length(old: list[str], new: list[str]) -> int:
    return next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))


def _kept_ends(old: list[str], new: list[str]) -> list[tuple]:
    """The cheap bound's opcodes: the common leading and trailing words equal, the middle replaced."""
    start = _common_prefix_length(old, new)
    end = _common_prefix_length(old[start:][::-1], new[start:][::-1])
    old_end, new_end = len(old) - end, len(new) - end
    opcodes = [("equal", 0, start, 0, start)] if start else []
    if old_end > start or new_end > start:
        opcodes.append(("replace", start, old_end, start, new_end))
    if end:
        opcodes.append(("equal", old_end, len(old), new_end, len(new)))
    return opcodes


def _opcodes(before: str, after: str) -> tuple[list[str], list[str], list[tuple]]:
    old, new = _WORD.findall(before.strip()), _WORD.findall(after.strip())
    old_words, new_words = [w.rstrip() for w in old], [w.rstrip() for w in new]
    try:
        return old, new, _BoundedMatcher(old_words, new_words).get_opcodes()
    except _OverBudget:
        return old, new, _kept_ends(old_words, new_words)


def word_diff(before: str, after: str) -> list[DiffPart]:
    """The final text as runs of kept, deleted and inserted words (a deletion comes before its replacement)."""
    old, new, opcodes = _opcodes(before, after)
    parts = []
    for op, i1, i2, j1, j2 in opcodes:
        if op == "equal":
            parts.append(DiffPart("equal", "".join(new[j1:j2])))
            continue
        if i2 > i1:  # deleted words keep no line breaks of their own: the final text's layout shows
            parts += [DiffPart("delete", "".join(old[i1:i2]).rstrip()), DiffPart("equal", " ")]
        if j2 > j1:
            parts.append(DiffPart("insert", "".join(new[j1:j2])))
    return parts


def word_edit_distance(before: str, after: str) -> int:
    """Words inserted, deleted or substituted to turn before into after (a replaced run of
    m words by n words counts max(m, n)), following the word diff above, bounded as it is."""
    _, _, opcodes = _opcodes(before, after)
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in opcodes if op != "equal")
