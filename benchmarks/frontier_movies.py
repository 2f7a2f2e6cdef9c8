"""The real-parts task of `benchmarks.frontier` (`--task movies`): movie-review prefixes and VADER's sentiment.

The DPO paper's IMDb setup (Rafailov et al. 2023, Sec. 6.1): prompts are the first 2–8 tokens of a movie review, the
policy continues them, and a sentiment classifier nobody trained for the task scores the continuation. Offline and on
a CPU, that is:

- prompts: openings of movie reviews written from templates (who watched, what, when, and a first judgement or
  none), cut after their first 2 to 8 words: the same kind of prefix, without a download. These are 2–9 tokens for
  SmolLM2's tokenizer (as many tokens as words for 85 % of them: one token per common word, two for "don't" or a
  word with a comma);
- reward: VADER (Hutto & Gilbert 2014; `vaderSentiment`, MIT), a widely used lexicon-and-rule sentiment scorer with
  ~7,500 rated words, negation, intensifiers, "but", punctuation and emoticon rules, which ships its lexicon inside
  the package. Its compound score c ∈ (−1, 1) is already a squashed sum of valences (s / √(s² + 15)); the reward is
  r = (1 + c) / 2 ∈ (0, 1), a linear map that keeps VADER's ordering and spacing and puts "no sentiment" (c = 0, an
  empty completion too) at 0.5, as the toy task's σ(lexicon score) does. Only the completion is scored, as in the toy
  task: the prompt's words would add a constant per prompt.
"""

import functools
import random


# Who watched, and what: a review's opening clause. Templates, so that prompts are reproducible and offline.
VIEWERS = ("I", "We", "My wife and I", "My husband and I", "My friends and I", "My son and I", "My sister and I")
WATCHED = (
    "watched this movie",
    "saw this film",
    "rented this movie",
    "went to see this film",
    "caught this movie on TV",
    "watched this film on DVD",
    "saw this movie at a festival",
    "streamed this film",
)
WHEN = ("last night", "yesterday", "last weekend", "on a rainy Sunday", "after reading the book", "with low hopes", "")
# Openings about the film itself; some carry a first judgement, as real review openings do.
SUBJECTS = ("This movie", "This film", "The plot of this movie", "The acting in this film", "The ending of this movie",
            "The director of this film", "The cast of this movie", "The soundtrack of this film")  # fmt: skip
VERDICTS = ("is", "was", "is one of the", "was not what I", "is the kind of", "has", "really", "starts with")
OPENERS = (
    "When I first saw this movie,",
    "I have seen this film",
    "I had heard a lot about this movie",
    "As a fan of the original,",
    "I remember watching this film",
    "I don't usually write reviews, but",
    "This is the second time I",
    "Having seen all of his films,",
)


def review_opening(rng: random.Random) -> str:
    """One opening sentence of a review, drawn from the templates above."""
    kind = rng.randrange(3)
    if kind == 0:
        return " ".join(filter(None, (rng.choice(VIEWERS), rng.choice(WATCHED), rng.choice(WHEN)))) + " and"
    if kind == 1:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERDICTS)}"
    return rng.choice(OPENERS)


def make_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """
    `n` distinct prompts: review openings cut after their first 2 to 8 words (fewer if the opening is shorter).
    Prompts in `exclude` are skipped (held-out sets).
    """
    rng = random.Random(seed)
    prompts: list[str] = []
    seen = set(exclude)
    if n == 0:
        return prompts
    for _ in range(1000 * n):
        words = review_opening(rng).split()
        prompt = " ".join(words[: rng.randint(2, 8)])
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
            if len(prompts) == n:
                return prompts
    raise ValueError(f"the templates give fewer than {n} distinct prompts outside the {len(exclude)} excluded")


def split_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """
    `n_train` training and `n_heldout` held-out prompts, disjoint: one draw, split at random, so that both come from
    the same mix of openings and lengths (the templates give ~725 distinct prompts; a training set drawn first would
    take most of the short ones).
    """
    prompts = make_prompts(n_train + n_heldout, seed=seed + 1)
    random.Random(seed + 2).shuffle(prompts)
    return prompts[n_heldout:], prompts[:n_heldout]


@functools.cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound score of `text`, in (−1, 1); 0 for no sentiment."""
    return _analyzer().polarity_scores(text)["compound"]


def sentiment_reward(prompt: str, completion: str) -> float:
    """r(x, y) = (1 + VADER compound(y)) / 2 ∈ (0, 1): the sentiment of what the model wrote, 0.5 for none."""
    return (1.0 + vader_compound(completion)) / 2.0
