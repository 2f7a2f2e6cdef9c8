"""Every adapter save is checked against the model that wrote it: a file lacking trainable adapter weights (empty, as
FSDP1 with peft 0.21 writes it, or partial) fails at the save with the file, the counts and the likely cause named."""

import peft.peft_model
import pytest
from peft import LoraConfig
from safetensors import safe_open

from trl_dpo_ext import DPOTrainer, load_qlora_model
from trl_dpo_ext.saved_run import IncompleteAdapterError, check_saved_adapter, expected_adapter_keys


@pytest.fixture
def trainer(tiny_dir, tokenizer, dpo_args, pairs):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = load_qlora_model(tiny_dir, lora)
    return DPOTrainer(model=model, args=dpo_args(), train_dataset=pairs, processing_class=tokenizer)


def test_a_normal_save_holds_every_trainable_adapter_weight(trainer, tmp_path):
    trainer.save_model(str(tmp_path / "ok"))  # final save: checked
    trainer.save_model(str(tmp_path / "ckpt"), _internal_call=True)  # a checkpoint's save: checked too
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = expected_adapter_keys(model)
    assert len(expected) == len(trainable) == 2 * 2 * 2 + 1  # 2 layers x (q, v) x (A, B) + the lm_head copy
    for directory in ("ok", "ckpt"):
        path = check_saved_adapter(model, tmp_path / directory)
        with safe_open(path, framework="pt") as saved:
            assert set(saved.keys()) == expected  # the naming is peft's, exactly: nothing extra, nothing missing


@pytest.mark.parametrize("kept", [0, 3], ids=["empty", "partial"])
def test_an_empty_or_partial_adapter_fails_at_the_save(trainer, tmp_path, monkeypatch, kept):
    save_file = peft.peft_model.safe_save_file

    def lossy(tensors, filename, *args, **kwargs):  # what a sharded save with unmatched keys writes
        return save_file(dict(sorted(tensors.items())[:kept]), filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", lossy)
    with pytest.raises(IncompleteAdapterError) as error:
        trainer.save_model(str(tmp_path / "bad"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad' / 'adapter_model.safetensors'} holds {kept} of the 9 trainable")
    assert f"({9 - kept} missing, e.g. ['base_model.model." in message
    assert ("the saved adapter is empty" if kept == 0 else "the saved adapter is partial") in message
    assert "FSDP1" in message and "\n" not in message


def test_a_missing_adapter_file_fails(trainer, tmp_path):
    with pytest.raises(IncompleteAdapterError, match="holds 0 of the 9 trainable adapter weights"):
        check_saved_adapter(trainer.accelerator.unwrap_model(trainer.model), tmp_path)
