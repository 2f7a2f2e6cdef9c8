"""Regenerate the bundled toy preference set `trl_dpo_ext/data/toy_preferences.jsonl`.

    python recipes/make_toy_preferences.py

The rule a reader can check: the chosen answer agrees to help and praises the item; the rejected answer refuses and
runs it down. Test prompts ask about items that never appear in training, so held-out reward accuracy measures whether
DPO learned the rule rather than the rows.
"""

import json
import random
from pathlib import Path


TRAIN_ITEMS = [
    "laptop",
    "bicycle",
    "kettle",
    "backpack",
    "camera",
    "guitar",
    "blender",
    "lamp",
    "tent",
    "jacket",
    "phone",
    "watch",
    "desk",
    "chair",
    "printer",
    "speaker",
    "toaster",
    "scooter",
    "notebook",
    "umbrella",
    "mattress",
    "helmet",
    "monitor",
    "keyboard",
    "headset",
    "stroller",
    "drill",
    "oven",
    "fridge",
    "sofa",
]
TEST_ITEMS = ["kayak", "telescope", "piano", "microwave", "suitcase", "tablet", "projector", "vacuum"]
BRANDS = ["Acme", "Nova", "Zenith", "Orbit", "Pioneer", "Summit", "Vertex", "Atlas"]
ASKS = [
    "Can you recommend a good {item}?",
    "Is the {brand} {item} worth buying?",
    "What do you think of the {brand} {item}?",
    "I need a new {item}. Any advice?",
]
POSITIVE = ["reliable", "sturdy", "comfortable", "quiet", "elegant", "durable", "fast", "handy", "excellent", "great"]
NEGATIVE = ["flimsy", "noisy", "awful", "clumsy", "ugly", "fragile", "slow", "useless", "terrible", "bad"]


def pair(rng: random.Random, item: str) -> dict:
    brand = rng.choice(BRANDS)
    prompt = "User: " + rng.choice(ASKS).format(item=item, brand=brand) + "\nAssistant:"
    good = rng.sample(POSITIVE, 2)
    bad = rng.sample(NEGATIVE, 2)
    return {
        "prompt": prompt,
        "chosen": f" Sure! The {brand} {item} is {good[0]} and {good[1]}.",
        "rejected": f" No. The {brand} {item} is {bad[0]} and {bad[1]}.",
    }


def main(path: Path = Path(__file__).parents[1] / "trl_dpo_ext" / "data" / "toy_preferences.jsonl") -> None:
    rng = random.Random(0)
    rows = [{**pair(rng, rng.choice(TRAIN_ITEMS)), "split": "train"} for _ in range(320)]
    rows += [{**pair(rng, rng.choice(TEST_ITEMS)), "split": "test"} for _ in range(80)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
