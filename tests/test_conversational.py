"""TRL's conversational preference formats go through the chat template; bad messages fail with column and row."""

import math
import shutil

import pytest
from datasets import Dataset
from numerics import zero_margin_loss
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_dpo_ext import DPOTrainer, load_qlora_model, recipe, to_conversational, validate_preference_dataset
from trl_dpo_ext.preference_data import bundled_preference_dataset, transcript_messages


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


EXPLICIT = [
    pair([user("Is the Acme kettle good?")], "Sure! It is great.", "No."),
    pair([{"role": "system", "content": "Be brief."}, user("Help me?")], "Sure! Happy to help you.", "No. Go away."),
    pair([user("Recommend a lamp.")], "The Nova lamp.", "Any lamp is bad."),
    pair([user("Hi")], "Hello! How can I help?", "What?"),
]
# The same pairs with the prompt left implicit: full conversations that share their leading turns.
IMPLICIT = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in EXPLICIT]


@pytest.fixture
def model(tiny_dir):
    return load_qlora_model(
        tiny_dir, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), compute_dtype="float32"
    )


def rendered(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.numerics
def test_explicit_and_implicit_prompts_go_through_the_chat_template_and_train(model, tokenizer, dpo_args):
    implicit = DPOTrainer(
        model=model, args=dpo_args(), train_dataset=Dataset.from_list(IMPLICIT), processing_class=tokenizer
    )
    explicit = DPOTrainer(
        model=model, args=dpo_args(max_steps=2), train_dataset=Dataset.from_list(EXPLICIT), processing_class=tokenizer
    )
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (
        implicit.train_dataset.select_columns(columns).to_list()
        == explicit.train_dataset.select_columns(columns).to_list()
    )
    for row, prepared in zip(EXPLICIT, explicit.train_dataset):
        prompt_text = rendered(tokenizer, row["prompt"], generation_prompt=True)
        assert tokenizer.decode(prepared["prompt_ids"]) == prompt_text
        for answer in ("chosen", "rejected"):
            full_text = rendered(tokenizer, row["prompt"] + row[answer])
            assert tokenizer.decode(prepared[f"{answer}_ids"]) == full_text[len(prompt_text) :]
            assert prepared[f"{answer}_ids"][-1] == tokenizer.eos_token_id  # the template ends an answer with EOS

    explicit.train()
    first, second = [row for row in explicit.state.log_history if "loss" in row]
    # Step 1, before any update, with a fresh adapter (B = 0, so it adds exactly 0): the policy and the reference
    # (adapters off) run the same kernels on the same batch, so every margin is exactly 0: the loss is log 2 in fp32.
    assert first["loss"] == zero_margin_loss(explicit.args.per_device_train_batch_size)
    assert math.isfinite(second["loss"]) and second["loss"] != first["loss"]


def test_the_recipe_flag_makes_the_bundled_set_conversational(model, tokenizer, dpo_args, tmp_path):
    standard = bundled_preference_dataset()["test"].select(range(4))
    chat = to_conversational(standard)
    question = standard[0]["prompt"].removeprefix("User: ").removesuffix("\nAssistant:")
    assert chat[0]["prompt"] == [user(question)]
    assert chat[0]["chosen"] == [assistant(standard[0]["chosen"].strip())]
    assert to_conversational(chat).to_list() == chat.to_list()  # already conversational: unchanged

    trainer = DPOTrainer(model=model, args=dpo_args(), train_dataset=chat, processing_class=tokenizer)
    prepared_standard = trainer._prepare_dataset(standard, tokenizer, trainer.args, "standard")
    for chat_row, prepared_chat, prepared in zip(chat, trainer.train_dataset, prepared_standard):
        assert tokenizer.decode(prepared_chat["prompt_ids"]) == rendered(tokenizer, chat_row["prompt"], True)
        # The template ends an assistant turn with EOS, as TRL does for standard rows: the same answer tokens.
        assert prepared_chat["chosen_ids"] == prepared["chosen_ids"]
        assert prepared_chat["rejected_ids"] == prepared["rejected_ids"]

    *_, recipe_args = recipe.parse(["--dataset_format", "chat", "--output_dir", str(tmp_path)])
    assert recipe_args.dataset_format == "chat"
    with pytest.raises(SystemExit):
        recipe.parse(["--dataset_format", "xml", "--output_dir", str(tmp_path)])


def test_the_chat_flag_needs_a_chat_template(tiny_dir, tmp_path):
    plain = tmp_path / "no_template"
    shutil.copytree(tiny_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    argv = ["--config", "tiny", "--model_name_or_path", str(plain), "--dataset_format", "chat"]
    argv += ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--dataset_format chat needs a tokenizer with a chat template"):
        recipe.main(*recipe.parse(argv))


def test_transcripts_become_messages():
    assert transcript_messages("User: Any advice?\nAssistant:") == [user("Any advice?")]
    assert transcript_messages("System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Help?\nAssistant:") == [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello!"),
        user("Help?"),
    ]
    assert transcript_messages("Tell me a joke.") == [user("Tell me a joke.")]


@pytest.mark.parametrize(
    "rows, error",
    [
        (
            [EXPLICIT[0], {**EXPLICIT[1], "prompt": [{"content": "Help me?"}]}],
            "train dataset: column 'prompt', row 1: message 0 has no string 'role'",
        ),
        (
            [EXPLICIT[0], EXPLICIT[1], {**EXPLICIT[2], "chosen": [{"role": "assistant"}]}],
            "train dataset: column 'chosen', row 2: message 0 has no string 'content'",
        ),
        (
            [IMPLICIT[0], {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hey"), assistant("No.")]}],
            "train dataset: row 1: 'chosen' and 'rejected' differ from their first message",
        ),
        (
            [{**EXPLICIT[0], "prompt": "Is the Acme kettle good?"}],
            "train dataset: column 'prompt', row 0: expected a list of messages like the first row, got str",
        ),
    ],
)
def test_bad_messages_fail_with_the_column_and_row(rows, error):
    with pytest.raises(ValueError, match=error):
        validate_preference_dataset(Dataset.from_list(rows))


def test_the_trainer_checks_messages_before_training(tiny_dir, tokenizer, dpo_args):
    rows = [EXPLICIT[0], {**EXPLICIT[3], "rejected": [{"role": "assistant", "text": "What?"}]}]
    with pytest.raises(ValueError, match="train dataset: column 'rejected', row 1: message 0 has no string 'content'"):
        DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_dir),
            args=dpo_args(),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
