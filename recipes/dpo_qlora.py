"""DPO with QLoRA on one GPU: one 4-bit NF4 base, policy = base + LoRA, reference = the same base with adapters off.

    accelerate launch recipes/dpo_qlora.py                      # offline: tiny local model + bundled preference set
    accelerate launch recipes/dpo_qlora.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --output_dir runs/qwen-dpo

Settings come from `recipes/configs/dpo_qlora.yaml` unless `--config` names another file; any flag overrides both.
"""

import sys
from pathlib import Path

from accelerate import PartialState
from transformers import AutoTokenizer
from trl import ScriptArguments, TrlParser, get_peft_config

from trl_dpo_ext import DPOConfig, DPOTrainer, load_preference_dataset, load_qlora_model, preference_accuracy
from trl_dpo_ext.config import QLoRAModelConfig, RecipeArguments, device_defaults
from trl_dpo_ext.defaults import default_model_path
from trl_dpo_ext.reward import reward_margins


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "dpo_qlora.yaml"


def main(script_args, training_args, model_args, recipe_args):
    state = PartialState()
    # No model named: build (once) the tiny local default instead of reaching for the Hub.
    with state.main_process_first():
        model_path = model_args.model_name_or_path or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    dataset = load_preference_dataset(script_args.dataset_name, script_args.dataset_config)
    heldout = None
    if recipe_args.heldout_pairs and script_args.dataset_test_split in dataset:
        test = dataset[script_args.dataset_test_split]
        heldout = test.select(range(min(recipe_args.heldout_pairs, len(test))))

    model = load_qlora_model(
        model_path,
        None if model_args.sft_adapter_path else get_peft_config(model_args),
        sft_adapter_path=model_args.sft_adapter_path,
        compute_dtype=model_args.bnb_4bit_compute_dtype,
        double_quant=model_args.use_bnb_nested_quant,
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )

    before = preference_accuracy(reward_margins(trainer, heldout)) if heldout is not None else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = preference_accuracy(reward_margins(trainer, heldout)) if heldout is not None else None

    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    out = Path(training_args.output_dir)
    if before is not None:
        trainer.accelerator.print(
            f"Held-out reward accuracy ({len(heldout)} pairs): {before:.3f} before -> {after:.3f} after training"
        )
    trainer.accelerator.print(f"Adapter saved to {out}")
    trainer.accelerator.print(f"Metrics: {out / 'metrics_history.json'}  plot: {out / 'metrics.png'}")
    trainer.end()
    return {"heldout_accuracy_before": before, "heldout_accuracy_after": after}


def parse(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = TrlParser((ScriptArguments, DPOConfig, QLoRAModelConfig, RecipeArguments))
    parser.set_defaults(**device_defaults())
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    main(*parse())
