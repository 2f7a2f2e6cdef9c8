"""A TRL PPO script, run as DPO. Shaped like TRL's `examples/scripts/ppo/ppo.py`; the changed line is the import, and
TRL's `shutil.rmtree(output_dir)` is gone: an `--output_dir` holding anything but a run of this script is refused, one
of its runs is reused (pass `--resume_from_checkpoint last` to resume its training).

    accelerate launch recipes/ppo_to_dpo.py            # offline: tiny local policy + reward model, bundled prompts
    accelerate launch recipes/ppo_to_dpo.py --sft_model_path EleutherAI/pythia-1b-deduped \
        --reward_model_path EleutherAI/pythia-1b-deduped \
        --dataset_name trl-internal-testing/descriptiveness-sentiment-trl-style --dataset_train_split descriptiveness \
        --use_peft --load_in_4bit --output_dir runs/ppo-as-dpo

With the PPO defaults for `sft_model_path`/`reward_model_path` and no dataset, it uses the embedded tiny policy, a tiny
reward model built beside it (random weights: this demonstrates the pipeline, not a learned preference) and the
prompts of the bundled toy preference set.
"""

import sys

from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_dpo_ext import errors, ppo_api
from trl_dpo_ext.ppo_api import PPOConfig, PPOTrainer  # was: from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl_dpo_ext.preference_data import bundled_preference_dataset
from trl_dpo_ext.tiny_model import default_model_path, default_reward_model_path


PPO_DEFAULT_MODEL = PPOConfig.__dataclass_fields__["sft_model_path"].default


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, PPOConfig, ModelConfig))
    parser.set_defaults(bf16=False, gradient_checkpointing=False, learning_rate=1e-3, output_dir="runs/ppo_to_dpo")
    script_args, training_args, model_args = parser.parse_args_and_config()
    try:  # instead of TRL's shutil.rmtree(training_args.output_dir): never delete a directory we did not write
        ppo_api.check_reusable_output_dir(training_args.output_dir)
    except errors.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(errors.EXIT_USER_ERROR) from None
    with PartialState().main_process_first():
        if training_args.sft_model_path == PPO_DEFAULT_MODEL:
            training_args.sft_model_path = str(default_model_path())
        if training_args.reward_model_path == PPO_DEFAULT_MODEL:
            training_args.reward_model_path = str(default_reward_model_path())

    ################
    # Model & Tokenizer
    ################
    tokenizer = AutoTokenizer.from_pretrained(training_args.sft_model_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    value_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
    policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)

    peft_config = get_peft_config(model_args)
    if peft_config is None:
        ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)
    else:
        ref_policy = None

    ################
    # Dataset
    ################
    if script_args.dataset_name is None:
        dataset = bundled_preference_dataset()["train"].select_columns(["prompt"])
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
        )
    eval_samples = min(16, len(dataset) // 10)
    train_dataset = dataset.select(range(len(dataset) - eval_samples))
    eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))

    def prepare_dataset(dataset, tokenizer):
        """pre-tokenize the dataset before training; only collate during training"""

        def tokenize(element):
            return {"input_ids": tokenizer(element["prompt"], padding=False)["input_ids"]}

        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)

    with PartialState().local_main_process_first():
        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

    ################
    # Training
    ################
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    trainer.train()

    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    trainer.generate_completions()
