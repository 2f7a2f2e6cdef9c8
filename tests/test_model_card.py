"""`save_model` writes a Hub model card (README.md) and `dpo_config.json` (JSON, never a pickle) beside the adapter."""

import json

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig
from recipe_run import trained_run

from trl_dpo_ext import DPOTrainer, load_qlora_model


def test_recipe_card_has_the_hub_header_config_final_metrics_and_plot(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    out = run.output_dir
    card = ModelCard.load(out / "README.md")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert card.data.library_name == "peft"
    assert card.data.base_model == base
    assert {"trl", "dpo", "qlora"} <= set(card.data.tags)
    assert card.data.datasets is None  # the bundled toy set has no Hub id
    text = card.text
    for setting in ("`beta` | 0.1", "`learning_rate` | 0.005", "`max_steps` | 4", "`loss_type` | sigmoid"):
        assert f"| {setting} |" in text
    last = [row for row in json.loads((out / "metrics_history.json").read_text()) if "loss" in row][-1]
    assert "Last training log (step 4):" in text
    for name in ("loss", "rewards/accuracies", "rewards/margins", "kl", "tokens_per_second", "memory/peak_mib"):
        assert f"| `{name}` | {last[name]:.4g} |" in text
    assert "](metrics.png)" in text and (out / "metrics.png").stat().st_size > 1000
    assert "[None]" not in text and 'model="None"' not in text  # TRL's placeholders for a model not on the Hub
    assert text.index("## DPO with QLoRA") < text.index("## Citations")

    saved = json.loads((out / "dpo_config.json").read_text())
    assert saved["dpo_config"]["beta"] == 0.1 and saved["dpo_config"]["max_steps"] == 4
    quantization = saved["quantization_config"]
    assert quantization["bnb_4bit_quant_type"] == "nf4" and quantization["bnb_4bit_use_double_quant"] is True
    assert saved["collator"]["max_length"] == 512


@pytest.fixture
def trainer(tiny_dir, tokenizer, pairs, dpo_args):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = load_qlora_model(tiny_dir, lora, compute_dtype="float32")
    trainer = DPOTrainer(model=model, args=dpo_args(max_steps=1), train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    return trainer


def test_card_names_the_dataset_and_a_save_elsewhere_gets_a_copy(trainer, tmp_path):
    out = tmp_path / "out"  # the dpo_args output_dir
    trainer.save_model(dataset_name="trl-lib/ultrafeedback_binarized")
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert "[trl-lib/ultrafeedback_binarized](https://huggingface.co/datasets/trl-lib/ultrafeedback_binarized)" in (
        card.text
    )
    assert "LoRA adapter (r=4, alpha=8, dropout=0.0, on down_proj, gate_proj, k_proj, o_proj" in card.text
    assert "Reference: the same base with the adapter switched off." in card.text

    elsewhere = tmp_path / "elsewhere"
    trainer.save_model(str(elsewhere))
    assert (elsewhere / "adapter_model.safetensors").exists()
    assert (elsewhere / "README.md").read_text() == (out / "README.md").read_text()
    assert (elsewhere / "metrics.png").read_bytes() == (out / "metrics.png").read_bytes()
    assert json.loads((elsewhere / "dpo_config.json").read_text())["dpo_config"]["max_steps"] == 1


def test_a_checkpoint_save_writes_the_config_for_scoring_and_merging(trainer, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    trainer.save_model(str(checkpoint), _internal_call=True)  # as `Trainer._save_checkpoint` calls it
    assert json.loads((checkpoint / "dpo_config.json").read_text())["dpo_config"]["max_steps"] == 1
    assert not (tmp_path / "out" / "README.md").exists()  # the card is written by final saves and push_to_hub
