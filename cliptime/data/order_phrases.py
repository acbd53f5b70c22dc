"""How people say that one sound comes before another: order phrases composed from parts.

A phrase is a template with `{first}` and `{second}`; its reversal is the same template with the two events
swapped, so a caption and its negative differ in the order of the events only. Phrases are composed from
- a connective pattern, which fixes the clause order ("{first} followed by {second}", "{second}, preceded by
  {first}", "it starts with {first} and ends with {second}", ...),
- a lead naming the hearing ("you hear", "there is", ...) before patterns that open with an event,
- a capital first letter or not, and a closing full stop or not.

`TRAIN_PHRASES` (the `grammar` template set) are composed from the training patterns; `HELDOUT_PHRASES` from
patterns that never appear in training, used only to test whether a model understands order in words it has not
seen (`tclassify_*_heldout_phrasing`) rather than the tokens of its templates.
"""

from __future__ import annotations

import itertools

TRAIN_PATTERNS = (
    "{first} followed by {second}",
    "first {first}, then {second}",
    "{first}, then {second}",
    "{first}, and then {second}",
    "{first} before {second}",
    "{first} and afterwards {second}",
    "{first}, later {second}",
    "{first} is heard before {second}",
    "{first}, with {second} coming after",
    "{first} comes first and {second} comes next",
    "{second} after {first}",
    "{second}, preceded by {first}",
    "{second} following {first}",
    "after {first}, {second}",
    "it starts with {first} and ends with {second}",
    "{first} at the start, {second} at the end",
)
HELDOUT_PATTERNS = (
    "{first} and after that {second}",
    "{second} comes after {first}",
    "{first} precedes {second}",
    "once {first} stops, {second} starts",
    "{second}, but only after {first}",
    "{first} gives way to {second}",
    "the clip opens with {first} and closes with {second}",
    "{first} first, {second} second",
)
LEADS = ("", "you hear ", "we hear ", "there is ", "a recording of ")


def compose(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Every phrase of `patterns` x leads (for patterns that open with an event) x capital x full stop; an event's
    own label keeps its case, so a phrase that opens with an event has no capitalized twin."""
    phrases = []
    for pattern in patterns:
        leads = LEADS if pattern.startswith("{") else ("",)
        for lead, capital, stop in itertools.product(leads, (False, True), ("", ".")):
            phrase = lead + pattern + stop
            phrases.append(phrase[0].upper() + phrase[1:] if capital else phrase)
    return tuple(dict.fromkeys(phrases))


TRAIN_PHRASES = compose(TRAIN_PATTERNS)
HELDOUT_PHRASES = compose(HELDOUT_PATTERNS)


def reversal(phrase: str, first: str, second: str) -> tuple[str, str]:
    """(the caption saying `first` then `second`, the same words with the events swapped)."""
    return phrase.format(first=first, second=second), phrase.format(first=second, second=first)
