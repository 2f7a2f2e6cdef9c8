"""A preference a reader can check by eye, for the default model: ended on its own, then shorter.

The rule (`concise_key`, used to label the bundled SmolLM2 set and to score the recipe's held-out replies):
**a reply that ends on its own within the token budget beats one that is cut off at it, and among replies that end,
the shorter one wins.** Why this one: a 135M-parameter instruct model rambles — asked "What is a prime number?", most
of its samples run past 96 tokens, repeating and drifting off the question, while the ones that stop early are the
ones that answered it. Length is also the preference DPO is known to pick up fastest, so a few minutes on a CPU can
show it; it is not a claim that shorter is better in general.

As reward functions (`--reward concise` / `longer`, see [`trl_dpo_ext.sampling.load_reward`]) the rule is a word
count; "ended within the budget" comes from the sampler's `missing_eos_penalty` ([`CONCISE_EOS_PENALTY`]).
"""

from collections.abc import Sequence
from dataclasses import dataclass


# Makes "ended within the budget" outrank every word count under the concise reward (a reply has < 1000 words).
CONCISE_EOS_PENALTY = 1000.0


@dataclass(frozen=True)
class Reply:
    """One generated reply: its text, whether it ended on its own (EOS) within the budget, and its word count."""

    text: str
    finished: bool

    @property
    def words(self) -> int:
        return len(self.text.split())


def concise_key(reply: Reply) -> tuple[int, int]:
    """
    The rule as a sort key (higher is better): `(1, -words)` for a reply that ended on its own, `(0, 0)` for one cut
    off at the budget (the rule does not rank cut-off replies among themselves).
    """
    return (1, -reply.words) if reply.finished else (0, 0)


def best_and_worst(replies: Sequence[Reply], min_word_gap: int = 5) -> tuple[int, int] | None:
    """
    Indices of the best and worst reply under the rule, or None when the rule cannot tell them apart: all cut off,
    or all ended with word counts within `min_word_gap` (a difference that small is noise, not a preference).
    """
    order = sorted(range(len(replies)), key=lambda i: concise_key(replies[i]))
    best, worst = order[-1], order[0]
    a, b = concise_key(replies[best]), concise_key(replies[worst])
    if a == b or (a[0] == b[0] == 1 and a[1] - b[1] < min_word_gap):
        return None
    return best, worst


def rule_score(replies: Sequence[Reply]) -> dict[str, float]:
    """`ended`: share of replies that ended on their own within the budget (the rule's score); `words`: mean words."""
    return {
        "ended": sum(r.finished for r in replies) / len(replies),
        "words": sum(r.words for r in replies) / len(replies),
    }


def concise_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Fewer words score higher; with `missing_eos_penalty` = [`CONCISE_EOS_PENALTY`], a reply cut off at the budget
    ranks below any that ended (the rule of [`concise_key`])."""
    return [-float(len(c.split())) for c in completions]


def longer_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """More words score higher (a reward any policy can move, for tests and demonstrations)."""
    return [float(len(c.split())) for c in completions]
