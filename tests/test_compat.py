"""Drop-in compatibility: each constructor form and option of stock `trl.DPOTrainer` 1.16, with stock and with ours.

Each test runs the same call with `trl.DPOTrainer`/`trl.DPOConfig` and with ours and asserts the same outcome: both
train (same metric names), the same exception type and message where stock raises, and — where ours computes the same
math in the same batch shapes (the plain layout) — the same losses. TRL's own test file, run against ours, is the wider
net: `compat/run_trl_dpo_tests.py`.

Loss tolerance (1e-5): in the plain layout ours runs TRL's batch shapes and TRL's per-row reduction, so the per-token
log-probs are the same floats; what differs is the loss formula's implementation, a few fp32 operations on O(1)
values (error ~1e-7), and after one AdamW step from gradients equal to that precision, updates that AdamW normalises
(its first step moves each weight by ±lr whatever the gradient's size). 1e-5 is two orders above that and far below
the loss change one step makes (asserted).
"""

import math

import pytest
import torch
import trl
from cpu_settings import CPU_ARGS
from datasets import Dataset, DatasetDict
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from compat.standins import COMMON_CONFIG, build_tokenizer, dataset_rows
from trl_dpo_ext import DPOConfig, DPOTrainer
from trl_dpo_ext.models import quantized_modules
from trl_dpo_ext.reference import ADAPTERS_OFF, REF_MODEL


IMPLS = {"stock": (trl.DPOTrainer, trl.DPOConfig), "ours": (DPOTrainer, DPOConfig)}
CPU = {**CPU_ARGS, "max_steps": 2}


def zen(config: str = "standard_preference", split: str = "train") -> Dataset:
    return Dataset.from_list(dataset_rows("trl-internal-testing/zen", config)[split])


def args_for(impl: str, tmp_path, plain: bool = True, **overrides):
    config_cls = IMPLS[impl][1]
    if impl == "ours" and plain:
        overrides.setdefault("share_prompt", False)  # the plain layout: TRL's shapes, so the same floats
    return config_cls(output_dir=str(tmp_path / impl), **{**CPU, **overrides})


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def metric_names(trainer) -> set[str]:
    return {key for row in trainer.state.log_history for key in row}


def run_both(tmp_path, make, train: bool = True, plain: bool = True):
    """`make(trainer_cls, config_fn)` built and trained for stock and ours: {impl: trainer}. `plain=False` lets ours
    run its default (shared-prompt) layout."""
    trainers = {}
    for impl, (trainer_cls, _) in IMPLS.items():
        torch.manual_seed(0)
        trainer = make(trainer_cls, lambda impl=impl, **kw: args_for(impl, tmp_path, plain, **kw))
        if train:
            trainer.train()
        trainers[impl] = trainer
    return trainers


def assert_same_training(trainers, compare_losses: bool = True):
    stock, ours = trainers["stock"], trainers["ours"]
    # Ours logs every stock metric, plus its own (kl, displacement, throughput, memory, reference log-probs).
    assert metric_names(stock) <= metric_names(ours)
    if compare_losses:
        assert losses(ours) == pytest.approx(losses(stock), abs=1e-5)
        assert abs(losses(stock)[-1] - math.log(2)) > 1e-4  # the step moved the loss 10x beyond the tolerance


def assert_same_error(tmp_path, make):
    errors = {}
    for impl, (trainer_cls, _) in IMPLS.items():
        with pytest.raises(Exception) as error:
            make(trainer_cls, lambda impl=impl, **kw: args_for(impl, tmp_path, **kw))
        errors[impl] = (type(error.value), str(error.value))
    assert errors["ours"] == errors["stock"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny Llama with the stand-in tokenizer: a Qwen-style chat template that renders tools and tool calls."""
    path = tmp_path_factory.mktemp("chat")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **{**COMMON_CONFIG, "hidden_size": 32, "head_dim": 8},
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, chat_dir):
    """A tiny Qwen3-MoE (router with a load-balancing auxiliary loss)."""
    path = tmp_path_factory.mktemp("moe")
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.save_pretrained(path)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        output_router_logits=True, **COMMON_CONFIG,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def nf4() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


# 1. The model: a path string (with model_init_kwargs, 4-bit too), a PreTrainedModel, a PeftModel, peft_config.


def test_model_as_a_path_string_full_fine_tuning(tmp_path, chat_dir):
    trainers = run_both(tmp_path, lambda cls, args: cls(model=chat_dir, args=args(), train_dataset=zen()))
    assert_same_training(trainers)
    assert trainers["ours"].reference.kind == REF_MODEL  # TRL loaded a copy of the path as the reference


def test_model_as_a_string_in_4bit_with_peft_config_gets_the_shared_base_layout_and_cache(tmp_path, chat_dir):
    def make(cls, args, **extra):
        return cls(
            model=chat_dir,
            args=args(model_init_kwargs={"quantization_config": nf4(), "dtype": "float32"}, **extra),
            train_dataset=zen(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        )

    assert_same_training(run_both(tmp_path, make))
    ours = make(DPOTrainer, lambda **kw: DPOConfig(
        output_dir=str(tmp_path / "shared"), **{**CPU, **kw}, ref_cache=True, ref_cache_dir=str(tmp_path / "cache"),
    ))  # fmt: skip
    model = ours.model
    assert isinstance(model, PeftModel) and "ref" not in model.peft_config
    assert len(quantized_modules(model)) == 7 * COMMON_CONFIG["num_hidden_layers"]  # one 4-bit base, nothing else
    assert ours.reference.kind == ADAPTERS_OFF and ours.ref_model is None
    assert ours.share_prompt and ours.data_collator.share_prompt
    assert "ref_chosen_token_logps" in ours.train_dataset.column_names
    assert list((tmp_path / "cache").glob("*.safetensors"))
    ours.train()
    assert losses(ours)


def test_pretrained_model_with_peft_config(tmp_path, chat_dir):
    def make(cls, args):
        model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
        return cls(
            model=model, args=args(), train_dataset=zen(), peft_config=LoraConfig(r=4, target_modules="all-linear")
        )

    assert_same_training(run_both(tmp_path, make))


def test_peft_model_without_peft_config(tmp_path, chat_dir):
    def make(cls, args):
        model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
        return cls(model=get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")), args=args(),
                   train_dataset=zen())  # fmt: skip

    trainers = run_both(tmp_path, make)
    assert_same_training(trainers)
    # TRL copies the adapter as a frozen "ref"; for a fresh adapter that copy is the base, which ours runs instead.
    assert "ref" in trainers["stock"].model.peft_config and "ref" not in trainers["ours"].model.peft_config


def test_peft_model_with_peft_config_raises_as_stock(tmp_path, chat_dir):
    def make(cls, args):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_dir), LoraConfig(r=4))
        return cls(model=model, args=args(), train_dataset=zen(), peft_config=LoraConfig(r=4))

    assert_same_error(tmp_path, make)


def test_explicit_ref_model(tmp_path, chat_dir):
    def make(cls, args):
        model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
        with torch.no_grad():  # a reference other than the start, so the first loss is not log 2
            for param in reference.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        return cls(model=model, ref_model=reference, args=args(), train_dataset=zen())

    trainers = run_both(tmp_path, make)
    assert_same_training(trainers)
    assert abs(losses(trainers["stock"])[0] - math.log(2)) > 1e-3


def test_ref_model_as_a_string_behaves_as_stock(tmp_path, chat_dir):
    def make(cls, args):
        return cls(model=chat_dir, ref_model=chat_dir, args=args(), train_dataset=zen())

    outcomes = {}
    for impl, (cls, _) in IMPLS.items():
        try:
            make(cls, lambda impl=impl, **kw: args_for(impl, tmp_path, **kw)).train()
            outcomes[impl] = "trained"
        except Exception as error:  # stock 1.16 types `ref_model` as a model; whatever it does, ours does too
            outcomes[impl] = (type(error), str(error))
    assert outcomes["ours"] == outcomes["stock"]


# 2. Data: Dataset, IterableDataset, DatasetDict / dict of datasets for eval, every format TRL accepts.


def test_iterable_train_dataset(tmp_path, chat_dir):
    def make(cls, args):
        return cls(model=chat_dir, args=args(), train_dataset=zen().to_iterable_dataset())

    assert_same_training(run_both(tmp_path, make))


@pytest.mark.parametrize("kind", ["dataset", "iterable", "dataset_dict", "dict_of_iterable"])
def test_evaluate_on_every_eval_dataset_type(tmp_path, chat_dir, kind):
    test = zen(split="test")
    eval_dataset = {
        "dataset": test,
        "iterable": test.to_iterable_dataset(),
        "dataset_dict": DatasetDict({"a": test, "b": test}),
        "dict_of_iterable": {"a": test.to_iterable_dataset(), "b": test.to_iterable_dataset()},
    }[kind]

    def make(cls, args):
        return cls(model=chat_dir, args=args(), train_dataset=zen())

    trainers = run_both(tmp_path, make, train=False, plain=False)
    assert trainers["ours"].share_prompt  # batches of B shared rows and 2B answers, also through accelerate's loaders
    metrics = {impl: trainer.evaluate(eval_dataset=eval_dataset) for impl, trainer in trainers.items()}
    loss_keys = sorted(key for key in metrics["stock"] if key.endswith("_loss"))
    assert loss_keys and loss_keys == sorted(key for key in metrics["ours"] if key.endswith("_loss"))
    assert set(metrics["stock"]) - {k for k in metrics["stock"] if k.endswith(("_runtime", "per_second"))} <= set(
        metrics["ours"]
    )
    for key in loss_keys:  # untrained policy = reference: log 2 in both, for every split
        assert metrics["ours"][key] == pytest.approx(metrics["stock"][key], abs=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        "standard_preference",
        "standard_implicit_prompt_preference",
        "conversational_preference",
        "conversational_implicit_prompt_preference",
    ],
)
def test_every_preference_format(tmp_path, chat_dir, config):
    assert_same_training(
        run_both(tmp_path, lambda cls, args: cls(model=chat_dir, args=args(), train_dataset=zen(config)))
    )


def test_tool_calls_and_tools_column(tmp_path, chat_dir):
    rows = Dataset.from_list(dataset_rows("trl-internal-testing/toolcall", "preference")["train"])
    assert rows[0]["chosen"][0]["content"] is None  # a tool-call turn without content, as datasets stores it
    trainers = run_both(tmp_path, lambda cls, args: cls(model=chat_dir, args=args(max_length=256), train_dataset=rows))
    assert_same_training(trainers)
    assert trainers["ours"].train_dataset[0]["prompt_ids"] == trainers["stock"].train_dataset[0]["prompt_ids"]


def test_chat_template_kwargs_column(tmp_path, chat_dir):
    rows = zen("conversational_preference")
    rows = rows.add_column("chat_template_kwargs", [{"unused_flag": bool(i % 2)} for i in range(len(rows))])
    assert_same_training(run_both(tmp_path, lambda cls, args: cls(model=chat_dir, args=args(), train_dataset=rows)))


# 3. Options: precompute_ref_log_probs, padding_free, list loss types with weights, compute_metrics, MoE.


def peft_model(chat_dir):
    model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    return model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.parametrize(
    "options",
    [
        {"precompute_ref_log_probs": True},
        {"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.7, 0.3]},
        {"loss_type": ["sigmoid", "bco_pair", "sft"]},  # stock TRL's loss computes these; ours falls back to it
        {"loss_type": ["robust"], "label_smoothing": 0.1},
    ],
    ids=["precompute", "weighted-list", "stock-list", "robust"],
)
def test_options_train_with_the_same_losses(tmp_path, chat_dir, options):
    def make(cls, args):
        model, lora = peft_model(chat_dir)
        return cls(model=model, args=args(**options), train_dataset=zen(), peft_config=lora)

    assert_same_training(run_both(tmp_path, make))


def test_padding_free_trains_packed(tmp_path, chat_dir):
    def make(cls, args):
        return cls(model=chat_dir, args=args(padding_free=True), train_dataset=zen())

    trainers = run_both(tmp_path, make)
    # TRL 1.16 turns its padding_free off (plain batches); ours runs it, as packing: other shapes, so no loss parity.
    assert_same_training(trainers, compare_losses=False)
    assert trainers["ours"].packing and trainers["ours"].data_collator.packing


def test_compute_metrics(tmp_path, chat_dir):
    def make(cls, args):
        return cls(
            model=chat_dir,
            args=args(eval_strategy="steps", eval_steps=1),
            train_dataset=zen(),
            eval_dataset=zen(split="test"),
            compute_metrics=lambda prediction: {"my_metric": 0.123},
        )

    trainers = run_both(tmp_path, make)
    assert_same_training(trainers)
    for trainer in trainers.values():
        assert [row["eval_my_metric"] for row in trainer.state.log_history if "eval_my_metric" in row] == [0.123] * 2


def test_moe_model_with_aux_loss(tmp_path, moe_dir):
    trainers = run_both(tmp_path, lambda cls, args: cls(model=moe_dir, args=args(), train_dataset=zen()))
    assert_same_training(trainers)
    assert all(trainer.aux_loss_enabled for trainer in trainers.values())
    assert "aux_loss" in metric_names(trainers["ours"])


def test_moe_model_with_peft_config(tmp_path, moe_dir):
    def make(cls, args):
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj"])
        return cls(model=moe_dir, args=args(save_strategy="steps", save_steps=2), train_dataset=zen(),
                   peft_config=lora)  # fmt: skip

    trainers = run_both(tmp_path, make)
    assert_same_training(trainers)
    trainers["ours"].save_model()  # the model card names an adapter on parameters (no target_modules)
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "down_proj" in card
