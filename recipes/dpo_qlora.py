"""DPO with QLoRA on one GPU: one 4-bit NF4 base, policy = base + LoRA, reference = the same base with adapters off.

    accelerate launch recipes/dpo_qlora.py                # offline: SmolLM2-135M-Instruct on its own labelled replies
    accelerate launch recipes/dpo_qlora.py --config tiny  # offline, seconds: a tiny random model on toy pairs
    accelerate launch recipes/dpo_qlora.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --heldout_generations 0 --output_dir runs/qwen-dpo

Settings come from `trl_dpo_ext/configs/dpo_qlora.yaml` unless `--config` names another file (or a packaged config by
name: `tiny`); any flag overrides both.
The recipe itself lives in `trl_dpo_ext.recipe`, which `trl-dpo-ext dpo` runs too. A mistake in the settings or the
data ends it with `error: MESSAGE` and exit status 2, without a traceback unless TRL_DPO_EXT_DEBUG=1.
"""

import sys

from trl_dpo_ext import cli


def parse(argv: list[str] | None = None):
    from trl_dpo_ext import recipe

    return recipe.parse(argv)


if __name__ == "__main__":
    raise SystemExit(cli.run_recipe(sys.argv[1:]))
