"""One sampling module: the settings, the prompt loader, the reward-spec parser and the one generate loop."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_dpo_ext import length_rule
from trl_dpo_ext.sampling import (
    DEFAULTS,
    SamplingConfig,
    generate,
    load_prompts,
    load_reward,
    prompt_ids,
    replies,
)


REWARD_MODULE = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


def test_one_set_of_defaults_for_every_command():
    from trl_dpo_ext.command_args import PairsArguments
    from trl_dpo_ext.iterative import IterativeDPOConfig

    pairs = PairsArguments(output="x.jsonl").sampling()
    iterative = IterativeDPOConfig(output_dir="unused", bf16=False).sampling()
    for settings in (pairs, iterative):
        assert (settings.num_samples, settings.max_new_tokens, settings.temperature, settings.batch_size) == (
            DEFAULTS.num_samples, DEFAULTS.max_new_tokens, DEFAULTS.temperature, DEFAULTS.batch_size,
        )  # fmt: skip
    assert (DEFAULTS.num_samples, DEFAULTS.max_new_tokens, DEFAULTS.temperature) == (4, 64, 0.7)


def test_settings_errors_name_the_faces_flag():
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, got nan"):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="`generation_batch_size` must be >= 1, got 0"):
        SamplingConfig.from_flags({"batch_size": "generation_batch_size"}, batch_size=0)


def test_prompts_from_a_text_file_and_a_dataset_deduplicated(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\na\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a", "b"]  # blank lines skipped, repeats sampled once
    rows = [{"prompt": p, "chosen": "x", "rejected": "y"} for p in ("q1", "q2", "q1", "q3")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(tmp_path / "pairs.jsonl")) == ["q1", "q2", "q3"]  # a single file is its only split
    assert load_prompts(str(tmp_path / "pairs.jsonl"), max_prompts=2) == ["q1", "q2"]
    default = load_prompts()  # the default model's bundled prompts: chat messages, kept as messages
    assert default and isinstance(default[0], list) and default[0][0]["role"] == "user"
    assert len(default) == len({json.dumps(p) for p in default})
    with pytest.raises(ValueError, match="no split 'dev'; its splits are"):
        load_prompts(None, split="dev")


def test_every_reward_form_and_its_error(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    assert load_reward("concise").function is length_rule.concise_reward
    assert load_reward("concise").missing_eos_penalty == length_rule.CONCISE_EOS_PENALTY
    assert load_reward("longer").function(["p"], ["a b c"]) == [3.0]
    assert load_reward(f"{tmp_path / 'rewards.py'}:length").function(["p"], ["abc"]) == [3.0]
    assert load_reward("os.path:join").function("a", "b") == "a/b"
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    assert load_reward(str(tmp_path / "rm")).model_path == str(tmp_path / "rm")
    for spec, message in [
        ("length", "--reward must look like 'module:function' or 'file.py:function', got 'length'"),
        ("os.path:nope", "--reward 'os.path:nope': os.path has no function 'nope'"),
        (f"{tmp_path / 'missing.py'}:f", "no file"),
        ("no_such_module_x:f", "--reward 'no_such_module_x:f': cannot import no_such_module_x"),
        (str(tmp_path), "a directory without config.json is no reward model"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_reward(spec)


def test_greedy_replies_are_what_generate_gives_one_prompt_at_a_time(tiny_dir, tokenizer):
    # Left-padding a batch changes nothing a reply sees: each one equals the unpadded prompt's own greedy reply.
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = ["User: Hi\nAssistant:", [{"role": "user", "content": "Is the Acme kettle good?"}]]
    ids = prompt_ids(prompts, tokenizer)
    greedy = SamplingConfig(num_samples=1, max_new_tokens=6, do_sample=False)
    got = replies(generate(model, tokenizer, ids, greedy), tokenizer)
    for prompt, reply in zip(ids, got):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
        ended = (alone == tokenizer.eos_token_id).nonzero()
        end = int(ended[0]) if len(ended) else len(alone)
        assert reply.text == tokenizer.decode(alone[:end], skip_special_tokens=True).strip()
        assert reply.finished == bool(len(ended))


def test_sampling_is_seeded_without_touching_the_callers_rng(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = prompt_ids(["User: Hi\nAssistant:"], tokenizer)
    settings = SamplingConfig(num_samples=3, max_new_tokens=5, seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, ids, settings)[0][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(generate(model, tokenizer, ids, settings)[0][0], first)
