"""Word-level differences between a draft and the reviewer's final text.

The diff is computed on words (whitespace-separated), so a changed line break or a doubled
space is not an edit; each word keeps the whitespace after it for display. The edit distance
is read off the same diff: the number of words inserted, deleted or substituted."""

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Literal

_WORD = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class DiffPart:
    op: Literal["equal", "delete", "insert"]
    text: str


def _opcodes(before: str, after: str) -> tuple[list[str], list[str], list[tuple]]:
    old, new = _WORD.findall(before.strip()), _WORD.findall(after.strip())
    # autojunk off: long replies repeat common words, which must still be matched exactly
    matcher = SequenceMatcher(None, [w.rstrip() for w in old], [w.rstrip() for w in new], autojunk=False)
    return old, new, matcher.get_opcodes()


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
    m words by n words counts max(m, n)), following the word diff above."""
    _, _, opcodes = _opcodes(before, after)
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in opcodes if op != "equal")
