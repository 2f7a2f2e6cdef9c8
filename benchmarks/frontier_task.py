"""The synthetic task of `benchmarks.frontier`: a product-review grammar and a lexicon sentiment reward.

It stands in for the DPO paper's IMDb setup (Rafailov et al. 2023, Sec. 6.1): reviews to pretrain a small LM on,
review prefixes as prompts, and a ground-truth sentiment score of the whole review as the reward. Everything here is
pure Python with a seeded `random.Random`, so a reader can regenerate and check every number.
"""

import math
import random
import re


# The lexicon: the whole definition of "sentiment". Weight +1 or -1 per word; "not" flips the next word's sign.
POSITIVE = ("great", "sturdy", "quiet", "lovely", "excellent", "reliable", "solid", "perfect", "love", "recommend")
NEGATIVE = ("awful", "flimsy", "noisy", "broken", "cheap", "terrible", "useless", "poor", "hate", "regret")
LEXICON = {**{word: 1.0 for word in POSITIVE}, **{word: -1.0 for word in NEGATIVE}}

# Words with no sentiment: they fill the same slots, so the LM must choose sentiment, not just grammar.
NEUTRAL_ADJECTIVES = ("blue", "small", "heavy", "new", "plain", "round", "light", "grey")
ADJECTIVES = {
    "pos": ("great", "sturdy", "quiet", "lovely", "excellent", "reliable", "solid", "perfect"),
    "neg": ("awful", "flimsy", "noisy", "broken", "cheap", "terrible", "useless", "poor"),
    "neutral": NEUTRAL_ADJECTIVES,
}
VERBS = {"pos": ("love", "recommend"), "neg": ("hate", "regret"), "neutral": ("use", "own", "keep")}
ITEMS = ("kettle", "lamp", "toaster", "blender", "backpack", "chair", "jacket", "speaker", "mug", "clock", "fan")
PARTS = ("lid", "handle", "base", "cord", "switch", "finish", "button", "color")
PEOPLE = ("mother", "brother", "friend", "sister", "neighbor", "father")
OPENERS = (
    "I bought this {item} last week.",
    "My {person} gave me this {item}.",
    "We have used this {item} for a month.",
    "This {item} arrived on Monday.",
    "I got the {item} for my {person}.",
)
SENTENCES = (
    "The {part} is {adj}.",
    "The {part} is not {adj}.",
    "It feels {adj}.",
    "It looks {adj}.",
    "I {verb} it.",
    "Overall it is {adj}.",
)
# A review has a mood; each sentiment slot follows the mood with this probability and otherwise goes the other way or
# neutral, so the SFT model writes mixed reviews and a prompt's first sentence hints at, but does not fix, the rest.
MOODS = {"pos": 0.4, "neg": 0.4, "neutral": 0.2}
FOLLOW_MOOD = 0.7


def review_score(text: str) -> float:
    """
    The raw lexicon score s of a review: the sum of the lexicon weights of its words, where a word right after "not"
    counts with the opposite sign ("not great" is -1, "not awful" is +1). Words are lower-cased runs of letters.
    """
    words = re.findall(r"[a-z]+", text.lower())
    score = 0.0
    for before, word in zip(["", *words], words):
        score += LEXICON.get(word, 0.0) * (-1.0 if before == "not" else 1.0)
    return score


def sentiment_reward(prompt: str, completion: str) -> float:
    """
    r(x, y) = σ(s(y)) in (0, 1): the sentiment of what the model wrote. The prompt's own words would only add a
    constant per prompt; leaving them out makes 0.5 the neutral point for every prompt and stopping at once no escape
    from a negative prefix. (Prompts never end in "not", so no negation spans the boundary.)
    """
    return 1.0 / (1.0 + math.exp(-review_score(completion)))


def _slot_mood(mood: str, rng: random.Random) -> str:
    if mood == "neutral":
        return rng.choice(("pos", "neg", "neutral"))
    if rng.random() < FOLLOW_MOOD:
        return mood
    return rng.choice(("neg" if mood == "pos" else "pos", "neutral"))


def _sentence(mood: str, rng: random.Random) -> str:
    template = rng.choice(SENTENCES)
    slot = _slot_mood(mood, rng)
    if "not" in template.split() and slot != "neutral":
        slot = "neg" if slot == "pos" else "pos"  # "not awful" carries the mood "pos"
    return template.format(part=rng.choice(PARTS), adj=rng.choice(ADJECTIVES[slot]), verb=rng.choice(VERBS[slot]))


def make_review(rng: random.Random) -> tuple[str, list[str]]:
    """One review: an opener sentence (no sentiment) and 2 to 4 sentences that follow a mood drawn from `MOODS`."""
    mood = rng.choices(list(MOODS), weights=list(MOODS.values()))[0]
    opener = rng.choice(OPENERS).format(item=rng.choice(ITEMS), person=rng.choice(PEOPLE))
    return opener, [_sentence(mood, rng) for _ in range(rng.randint(2, 4))]


def make_corpus(n: int, seed: int) -> list[str]:
    """`n` reviews for SFT, each one line of text."""
    rng = random.Random(seed)
    return [" ".join([opener, *sentences]) for opener, sentences in (make_review(rng) for _ in range(n))]


def make_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """
    `n` distinct review prefixes: the opener, then the first sentence whole or only its first 2 or 3 words (so the
    prefix may already carry sentiment, as IMDb prefixes do). Prefixes in `exclude` are skipped (held-out sets).
    """
    rng = random.Random(seed)
    prompts: list[str] = []
    seen = set(exclude)
    while len(prompts) < n:
        opener, sentences = make_review(rng)
        words = sentences[0].split()
        cut = rng.choice((2, 3, len(words)))
        prompt = " ".join([opener, *words[:cut]])
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def split_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """`n_train` training prompts (seed + 1) and `n_heldout` held-out prompts (seed + 2) that are not among them."""
    train = make_prompts(n_train, seed=seed + 1)
    return train, make_prompts(n_heldout, seed=seed + 2, exclude=set(train))
