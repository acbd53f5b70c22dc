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

`SIMULTANEOUS_PHRASES` say that two sounds play together: the captions of overlapping clips, whose negative is an
ordered phrase of the same two events.
"""

from __future__ import annotations

import itertools
import re

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
SIMULTANEOUS_PHRASES = (
    "{first} while {second}",
    "{first} and {second} at the same time",
    "{first} together with {second}",
    "{first} and {second} together",
)


def reversal(phrase: str, first: str, second: str) -> tuple[str, str]:
    """(the caption saying `first` then `second`, the same words with the events swapped)."""
    return phrase.format(first=first, second=second), phrase.format(first=second, second=first)


# -- the order stated in free-text captions (cliptime.data.clotho) -------------------------------------------------
# Rules, not a parser: a caption states an order when exactly one connective below joins two event phrases. Swapping
# the two phrases around it gives exactly the caption with the events in reversed order, whichever event the
# connective names first ("X before Y" -> "Y before X", "Y after X" -> "X after Y"); the connective stays in the
# caption's own words. A clause without its own subject ("a man coughs and then sneezes") moves as it stands.
SOON = r"(?:(?:shortly|soon|just|right|immediately|quickly)\s+)?"
HEARD = r"(?:(?:(?:is|are)\s+heard|comes?|happens?|occurs?)\s+)?"
# "after a while", "one after another": time or repetition, not a second event
NOT_AN_EVENT = (
    r"(?!(?:a\s+(?:while|moment|bit|second|minute|short\s+\w+)|a\s+few\s+\w+|some\s+time|\w+\s+(?:seconds|minutes)"
    r"|another|the\s+other|each\s+other)\b)"
)
ORDER_RULES = (
    # (examples, connective between the two event phrases)
    ("X, then Y | X and then Y | X. Then Y", r"(?<!\bnow)(?<!\band)[,;.]?\s+(?:and\s+)?then,?\s+"),
    ("X, afterwards Y | X and later Y", r"(?:[,;.]\s+|,?\s+and\s+)(?:afterwards?|later(?:\s+on)?),?\s+"),
    (
        "X followed by Y | X is soon followed by Y",
        rf",?\s+(?:(?:and\s+)?(?:is|are|was|were|gets|get)\s+)?{SOON}followed\s+by\s+",
    ),
    ("Y, preceded by X | Y is preceded by X", rf",?\s+(?:(?:and\s+)?(?:is|are|was|were)\s+)?{SOON}preceded\s+by\s+"),
    ("Y following X", rf"(?<!\bthe),?\s+{SOON}following\s+"),
    ("X precedes Y", rf"\s+{SOON}precedes?\s+"),
    ("X before Y | X is heard just before Y", rf",?\s+{HEARD}{SOON}before,?\s+{NOT_AN_EVENT}"),
    (
        "Y after X | Y comes after X | Y, but only after X | X, and after that Y | X, after which Y",
        rf",?\s+(?:and\s+|but\s+only\s+)?{HEARD}{SOON}after(?:\s+(?:that|which))?,?\s+{NOT_AN_EVENT}",
    ),
)
# "After X, Y" | "Before X, Y": the connective opens the caption and a comma ends the first phrase
FRONTED_RULE = (
    rf"(?P<lead>{SOON}(?:after|before)\s+){NOT_AN_EVENT}(?!(?:that|this|which)\b)"
    r"(?P<a>[^,]+?)(?P<connective>\s*,\s*)(?P<b>\S.*)"
)
# order words mark a place in time, not an event: "First X, then Y" -> "First Y, then X"; "X first, then Y" alike
OPENING_ORDER_WORD = r"(?:at\s+first|firstly|first|initially),?\s+"
CLOSING_ORDER_WORD = r",?\s+(?:at\s+)?first$"

CONNECTIVE = re.compile("|".join(f"(?:{rule})" for _, rule in ORDER_RULES), re.IGNORECASE)
FRONTED = re.compile(FRONTED_RULE, re.IGNORECASE)
OPENING = re.compile(OPENING_ORDER_WORD, re.IGNORECASE)
CLOSING = re.compile(CLOSING_ORDER_WORD, re.IGNORECASE)


def _opening(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def _inner(phrase: str) -> str:
    """`phrase` moved from the start of a sentence into it: its capital goes, unless it is "I" or an acronym."""
    word = phrase.split()[0]
    return phrase if word == "I" or (len(word) > 1 and word.isupper()) else phrase[:1].lower() + phrase[1:]


def reversed_caption(caption: str) -> str:
    """`caption` with its two events in reversed order (`ORDER_RULES`, `FRONTED_RULE`); "" when it states no
    order of two events, or joins more than two (more than one connective)."""
    text = caption.strip()
    end = len(text.rstrip(".!? "))
    body, stop = text[:end], text[end:]
    fronted = FRONTED.fullmatch(body)
    if fronted and not CONNECTIVE.search(body, fronted.end("lead")):
        lead, a, connective, b, kept = fronted["lead"], fronted["a"], fronted["connective"], fronted["b"], ""
    else:
        opening = OPENING.match(body)
        lead = opening.group() if opening else ""
        found = list(CONNECTIVE.finditer(body, len(lead)))
        if len(found) != 1:
            return ""
        (m,) = found
        a, connective, b = body[len(lead) : m.start()], m.group(), body[m.end() :]
        closing = CLOSING.search(a)
        kept = closing.group() if closing else ""
        a = a[: len(a) - len(kept)]
    if not (re.search(r"\w", a) and re.search(r"\w", b)):
        return ""
    if not lead and a[:1].isupper():
        a, b = _inner(a), _opening(b)
    return lead + b + kept + connective + a + stop
