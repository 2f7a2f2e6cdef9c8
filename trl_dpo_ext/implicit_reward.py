"""Your language model is secretly a reward model (Rafailov et al. 2023, Eq. 5): r(x, y) = β·log(π(y|x) / π_ref(y|x)).

[`ImplicitReward`] holds a DPO adapter on its 4-bit base — one base in memory: adapters on for π, and for π_ref what
[`trl_dpo_ext.reference.Reference`] says (adapters off, the frozen SFT adapter, or a separate model) — and scores
responses in batches with the trainer's own pieces: TRL's tokenization, the [`PreferenceCollator`] layout the run used
(where the model can run it: [`trl_dpo_ext.layout.choose_layout`]), its pad id and
[`trl_dpo_ext.logps.completion_token_logps`]. Loaded from a directory saved by [`trl_dpo_ext.DPOTrainer`], or built
from a trainer ([`ImplicitReward.from_trainer`]), it gives the rewards the trainer computes; [`reward_margins`] gives a
trainer's margins on a preference dataset.
"""

import contextlib
import dataclasses
import logging
import types
from pathlib import Path

import torch
import trl
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset
from peft import PeftModel
from peft.utils import load_peft_weights
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.trainer.utils import add_fused_lm_head

from .collator import PreferenceCollator
from .layout import choose_layout, layout_configs
from .logps import completion_token_logps
from .metrics import preference_accuracy
from .models import base_model, cast_adapter_weights, keep_fp32_cpu_kernels, safe_pad_id
from .preference_data import validate_preference_dataset
from .reference import PRECOMPUTED, REFERENCE_ADAPTER, Reference
from .saved_run import load_base_as_trained, load_training_config


logger = logging.getLogger(__name__)


class ImplicitReward:
    """
    Scores (prompt, response) pairs with the implicit reward of a DPO policy: β·(log π(y|x) − log π_ref(y|x)).

    Args:
        model (`peft.PeftModel` or `PreTrainedModel`): the policy. It is not modified: scoring switches it to eval
            mode and adds TRL's fused LM head only while it runs.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (with a chat template for conversational rows).
        beta (`float`): the DPO β the adapter was trained with.
        collator (`PreferenceCollator`, *optional*): batch layout; the plain layout by default, padded with
            [`trl_dpo_ext.models.safe_pad_id`]. A layout the model cannot run falls back to the plain one (same
            rewards), with the reason logged.
        batch_size (`int`, *optional*, defaults to `8`): pairs per forward.
        reference ([`trl_dpo_ext.reference.Reference`], *optional*): π_ref; by default `Reference.of(model)`:
            adapters off, or the adapter named `"ref"` when the model has one.

    Example:
    ```python
    >>> reward = ImplicitReward.from_pretrained("runs/dpo_qlora")
    >>> reward.rank("User: Is the Acme kettle good?\\nAssistant:", [" No. It is bad.", " Sure! It is great."])
    [(' Sure! It is great.', 0.83...), (' No. It is bad.', -0.91...)]
    ```
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        beta: float,
        collator: PreferenceCollator | None = None,
        batch_size: int = 8,
        reference: Reference | None = None,
    ):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.reference = reference or Reference.of(model)
        if self.reference.kind == PRECOMPUTED:
            raise ValueError(
                "ImplicitReward needs a reference it can run: a PeftModel (the reference is its base with adapters "
                "off, or its frozen 'ref' adapter) or a `reference` with a ref_model."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.beta = beta
        if collator is None:
            collator = PreferenceCollator(pad_token_id=safe_pad_id(tokenizer, base_model(model)))
        self.collator = self._runnable(collator)
        self.batch_size = batch_size

    @classmethod
    def from_trainer(cls, trainer) -> "ImplicitReward":
        """The implicit reward of a [`trl_dpo_ext.DPOTrainer`]'s current policy: its model, reference, β, tokenizer,
        collator layout and eval batch size, so the scores are the rewards its loss computes."""
        collator = trainer.data_collator
        if not isinstance(collator, PreferenceCollator):
            collator = PreferenceCollator(pad_token_id=collator.pad_token_id, max_length=trainer.args.max_length)
        return cls(
            trainer.accelerator.unwrap_model(trainer.model),
            trainer._tokenizer,
            trainer.beta,
            collator=collator,
            batch_size=trainer.args.per_device_eval_batch_size,
            reference=trainer.reference,
        )

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str | Path,
        beta: float | None = None,
        base_model: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
    ) -> "ImplicitReward":
        """
        Load an adapter saved by [`trl_dpo_ext.DPOTrainer`] on its base, quantized as in training.

        Args:
            adapter_path (`str` or `Path`): the adapter directory (the run's `output_dir` or a checkpoint).
            beta (`float`, *optional*): overrides the β read from the adapter's `dpo_config.json`.
            base_model (`str`, *optional*): overrides the base model named in `adapter_config.json`.
            batch_size (`int`, *optional*): pairs per forward; the run's `per_device_eval_batch_size` by default.
            device (`str`, *optional*): `"cuda"` when available, else `"cpu"`, by default.
        """
        adapter_path = Path(adapter_path)
        saved = load_training_config(adapter_path)
        dpo_config = saved["dpo_config"] if saved else {}
        if beta is None:
            if "beta" not in dpo_config:
                raise ValueError(f"{adapter_path} has no dpo_config.json to read beta from: pass beta explicitly.")
            beta = dpo_config["beta"]
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = keep_fp32_cpu_kernels(load_base_as_trained(adapter_path, base_model, device))  # scored as trained
        model = PeftModel.from_pretrained(base, adapter_path)
        adapters = {"default": adapter_path}
        if (adapter_path / REFERENCE_ADAPTER / "adapter_config.json").is_file():  # trained from an SFT adapter
            model.load_adapter(adapter_path / REFERENCE_ADAPTER, adapter_name=REFERENCE_ADAPTER)
            adapters[REFERENCE_ADAPTER] = adapter_path / REFERENCE_ADAPTER
        # TRL trains the adapter of a 4-bit model in bfloat16 (the QLoRA recipe), and peft loads it upcast to the base
        # layer's dtype. Back in the saved dtype, the LoRA matmuls run as they did in training, so the rewards match
        # the trainer's.
        for name, path in adapters.items():
            dtype = _saved_dtype(path)
            if dtype is not None:
                cast_adapter_weights(model, dtype, name)
        has_tokenizer = (adapter_path / "tokenizer_config.json").is_file()
        tokenizer_source = adapter_path if has_tokenizer else model.peft_config["default"].base_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        if tokenizer.pad_token is None:  # as TRL's DPOTrainer does
            tokenizer.pad_token = tokenizer.eos_token
        collator = None
        if saved and saved.get("collator"):
            known = {f.name for f in dataclasses.fields(PreferenceCollator)}
            collator = PreferenceCollator(**{k: v for k, v in saved["collator"].items() if k in known})
        return cls(
            model,
            tokenizer,
            beta,
            collator=collator,
            batch_size=batch_size or dpo_config.get("per_device_eval_batch_size", 8),
        )

    def score(self, prompts: list, responses: list) -> torch.Tensor:
        """
        Implicit rewards of `responses[i]` to `prompts[i]`, shape `(len(prompts),)`.

        Prompts are strings or message lists (rendered by the chat template, with the generation prompt); a string
        response to a message-list prompt becomes one assistant message. Standard responses get the EOS token
        appended, as in training.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.empty(0)
        rows = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, list) and isinstance(response, str):
                response = [{"role": "assistant", "content": response}]
            rows.append({"prompt": prompt, "chosen": response, "rejected": response})
        tokenized = _tokenize(Dataset.from_list(rows), self.tokenizer)
        # Two responses to the same tokenized prompt share one collator row (one pair); a lone one is paired with
        # itself, so each response is tokenized on its own, as in training, whatever its neighbours.
        examples, slots, row = [], [], 0
        while row < len(tokenized):
            first = tokenized[row]
            second = tokenized[row + 1] if row + 1 < len(tokenized) else None
            if second is not None and second["prompt_ids"] == first["prompt_ids"]:
                examples.append(_pair(first, second))
                slots.append((row, row + 1))
                row += 2
            else:
                examples.append(_pair(first, first))
                slots.append((row, None))
                row += 1
        chosen, rejected = self._rewards(examples)
        rewards = torch.empty(len(tokenized))
        for (first, second), chosen_reward, rejected_reward in zip(slots, chosen, rejected):
            rewards[first] = chosen_reward
            if second is not None:
                rewards[second] = rejected_reward
        return rewards

    def rank(self, prompt, candidates: list) -> list[tuple]:
        """Best-of-n reranking: `(candidate, reward)` for every candidate, highest implicit reward first."""
        rewards = self.score([prompt] * len(candidates), candidates).tolist()
        return sorted(zip(candidates, rewards), key=lambda pair: pair[1], reverse=True)

    def margins(self, dataset: Dataset) -> torch.Tensor:
        """r(x, y_w) − r(x, y_l) for every row of a preference dataset (validated first), shape `(len(dataset),)`."""
        validate_preference_dataset(dataset, "scored")
        tokenized = _tokenize(dataset, self.tokenizer)
        chosen, rejected = self._rewards([_pair(row, row) for row in tokenized])
        return chosen - rejected

    def accuracy(self, dataset: Dataset) -> float:
        """Preference accuracy of a preference dataset: see [`trl_dpo_ext.preference_accuracy`] (ties count half)."""
        return preference_accuracy(self.margins(dataset))

    def _runnable(self, collator: PreferenceCollator) -> PreferenceCollator:
        """`collator`, or its plain-layout copy where the models cannot run its layout (the same rewards)."""
        models = [extract_model_from_parallel(self.model)]
        if self.reference.ref_model is not None:
            models.append(self.reference.ref_model)
        layout = choose_layout(collator.share_prompt, collator.packing, *layout_configs(models))
        if not layout.reasons:
            return collator
        logger.warning(layout.fallback_message())
        return dataclasses.replace(collator, share_prompt=False, packing=False)

    @torch.no_grad()
    def _rewards(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit rewards of the chosen and of the rejected answer of each collator example."""
        device = base_model(self.model).device
        chosen, rejected, empty = [], [], False
        with _scoring(self.model), _scoring(self.reference.ref_model):
            for start in range(0, len(examples), self.batch_size):
                batch = self.collator(examples[start : start + self.batch_size])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                policy = completion_token_logps(self.model, batch, statistics=False)
                reference = self.reference.token_logps(self.model, batch).sequence_logps()
                rewards = self.beta * (policy.sequence_logps() - reference)
                batch_chosen, batch_rejected = rewards.float().cpu().chunk(2)
                chosen.append(batch_chosen)
                rejected.append(batch_rejected)
                empty = empty or bool((policy.lengths() == 0).any())
        if empty:
            # Training drops such rows (their prompt fills max_length); here they stay, so outputs match inputs.
            logger.warning(
                "Some answers have no token left after truncation to max_length=%s: their reward is 0.",
                self.collator.max_length,
            )
        return torch.cat(chosen), torch.cat(rejected)


@contextlib.contextmanager
def _scoring(model: torch.nn.Module | None):
    """Within: `model` in eval mode with TRL's fused LM head; afterwards exactly as it was given."""
    if model is None:
        yield
        return
    base = base_model(model)
    was_training = model.training
    # `add_fused_lm_head` replaces the instance's `forward`; a trainer's model has it already, and keeps it.
    patched = "forward" not in vars(base)
    if patched:
        add_fused_lm_head(base)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if patched:
            del base.forward


def _tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    # TRL's own preference tokenization (implicit-prompt extraction, EOS on standard answers, the chat template on
    # conversational rows, the prompt/answer split); `trl.DPOTrainer._prepare_dataset` reads nothing of the trainer
    # but `_tokenizer`. `max_length=None`: truncation is left to the collator, as in training, and no row is dropped,
    # so the scores line up with the inputs.
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    settings = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return trl.DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, settings, "scored")


def _pair(chosen_row: dict, rejected_row: dict) -> dict:
    return {
        "prompt_ids": chosen_row["prompt_ids"],
        "chosen_ids": chosen_row["chosen_ids"],
        "rejected_ids": rejected_row["rejected_ids"],
    }


def _saved_dtype(adapter_path: Path) -> torch.dtype | None:
    """The dtype of an adapter's saved weights, or None when they are not all of one dtype."""
    dtypes = {tensor.dtype for tensor in load_peft_weights(str(adapter_path), device="cpu").values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def reward_margins(trainer, dataset: Dataset) -> torch.Tensor:
    """
    r(x, y_w) − r(x, y_l) for every pair of `dataset` under the trainer's current policy and reference: the margins
    [`ImplicitReward.from_trainer`] computes, one per row (a pair whose prompt fills `max_length` keeps its row, as a
    tie), so the count and the values agree with `ImplicitReward.margins` by construction.

    Args:
        trainer ([`trl_dpo_ext.DPOTrainer`]): supplies the policy, the reference, β and the collator.
        dataset (`datasets.Dataset`): raw preference rows (prompt/chosen/rejected), validated and tokenized there.

    Returns:
        `torch.Tensor` of shape `(len(dataset),)`. Every process computes all rows (a held-out set is small).
    """
    return ImplicitReward.from_trainer(trainer).margins(dataset)
