"""Rule-based reward models for the six demo dimensions (`RewardModel`: `score(prompts, responses)`).

Every score is a real number, higher = more of the dimension, computed from the response's words:

| code | name          | score                                                                              |
| ---- | ------------- | ---------------------------------------------------------------------------------- |
| P1A  | elementary    | 4 * (share of words of at most 5 letters - share of words of at least 9 letters)   |
| P1B  | knowledgeable | 4 * (share of words of at least 9 letters - share of words of at most 5 letters)   |
| P2A  | concise       | -(words beyond a 16-word target) / 8                                               |
| P2B  | informative   | (sentences + explanatory connectives: "because", "also", "for example", ...) / 2   |
| P3A  | friendly      | (friendly or witty markers: "friend", "haha", "!", ... - rude markers) / 3         |
| P3B  | unfriendly    | (rude or dismissive markers: "ugh", "whatever", "stop", ... - friendly markers) / 3 |

The scales put the gap between the two sides of an axis at 2 to 3 units on the corpus, so that no
dimension saturates the Bradley-Terry normalisation before the others. An empty response scores 0
on the word-share dimensions. The reward of a response for a composite preference is the mean over
its dimensions of `bt_normalize(score, score_of_reference)`.
"""

import re
from collections.abc import Callable

from mope.rewards import RuleScorer, register_scorer

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
SENTENCE_END = re.compile(r"[.!?]+")
CONCISE_TARGET_WORDS = 16
CONNECTIVES = re.compile(
    r"\b(because|also|for example|this means|consequently|furthermore|therefore)\b", re.IGNORECASE
)
FRIENDLY = re.compile(r"\b(friend|buddy|love|happy|fun|smile|haha|awesome|great)\b|!", re.I)
RUDE = re.compile(r"\b(ugh|obviously|whatever|fine|yourself|stop|bothering|do not ask|annoying)\b", re.I)


def _words(text: str) -> list[str]:
    return WORD.findall(text)


def _word_length_balance(text: str) -> float:
    """4 * (share of short words (<= 5 letters) - share of long words (>= 9 letters))."""
    words = _words(text)
    if not words:
        return 0.0
    short = sum(len(w) <= 5 for w in words)
    long = sum(len(w) >= 9 for w in words)
    return 4 * (short - long) / len(words)


def elementary(text: str) -> float:
    return _word_length_balance(text)


def knowledgeable(text: str) -> float:
    return -_word_length_balance(text)


def concise(text: str) -> float:
    return -max(0, len(_words(text)) - CONCISE_TARGET_WORDS) / 8


def informative(text: str) -> float:
    sentences = len([s for s in SENTENCE_END.split(text) if _words(s)])
    return (sentences + len(CONNECTIVES.findall(text))) / 2


def friendly(text: str) -> float:
    return (len(FRIENDLY.findall(text)) - len(RUDE.findall(text))) / 3


def unfriendly(text: str) -> float:
    return (len(RUDE.findall(text)) - len(FRIENDLY.findall(text))) / 3


def demo_scorer(dimension: str) -> RuleScorer:
    """The rule-based reward model of one dimension code (P1A..P3B)."""
    if dimension not in RULES:
        raise ValueError(f"dimension must be one of {', '.join(RULES)}, got {dimension!r}")
    rule = RULES[dimension]
    return RuleScorer(lambda _prompt, response: rule(response))


RULES: dict[str, Callable[[str], float]] = {
    "P1A": elementary,
    "P1B": knowledgeable,
    "P2A": concise,
    "P2B": informative,
    "P3A": friendly,
    "P3B": unfriendly,
}
SCORERS: dict[str, RuleScorer] = {code: demo_scorer(code) for code in RULES}
register_scorer("demo", demo_scorer)  # reward specs {"type": "demo", "dimension": "P1A"} in train configs
