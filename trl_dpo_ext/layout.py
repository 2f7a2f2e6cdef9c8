"""Where the tokens of a preference batch sit in the forward: plain rows, a shared prompt, packed rows.

Stock `trl.DPOTrainer` lays B pairs out as 2B padded rows `[prompt│chosen]`, `[prompt│rejected]`, so every prompt runs
twice. With **prompt sharing** a pair is one sequence

    tokens     p_0 … p_{P-2} │ p_{P-1} c_0 … c_{C-1} │ p_{P-1} r_0 … r_{R-1}
    positions  0 … P-2       │ P-1     P  … P+C-1   │ P-1     P  … P+R-1
    branch     0 (trunk)     │ 1 (chosen)           │ 2 (rejected)

and a token attends to the trunk and to the earlier tokens of its own branch only. The last prompt token is repeated at
the head of each branch because its hidden state predicts the first answer token, and the fused LM head scores one
label per position; the copy sees exactly the context of the original (the trunk and itself, at position P-1). So every
answer token sees exactly the context it has in the plain layout: the log-probs are the same function of the weights.

With **packing**, all sequences of a batch (pairs, or single sequences without prompt sharing) go into ONE row: each
keeps its own position ids, a block-diagonal mask keeps them apart, and no pad token is computed.

Everything here is a pure function on token lists, tensors and configs; the collator builds the rows, `logps.py`
turns `doc_ids`/`branch_ids` into the 4D mask on the model's device, and [`choose_layout`] decides, for the trainer
and for [`trl_dpo_ext.ImplicitReward`] alike, which layout runs.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .models import base_model


TRUNK, CHOSEN, REJECTED = 0, 1, 2
# Attention kernels that take an arbitrary dense 4D mask from transformers (flash-attention does not).
MASKABLE_ATTENTION = ("sdpa", "eager")
# Layer types (`config.layer_types`) whose only token mixing is attention under the mask: the MLP and MoE blocks of
# hybrid models mix no tokens at all.
MASKED_LAYER_TYPES = frozenset({"full_attention", "attention", "mlp", "moe"})


def check_reference_length(num_values: int, num_tokens: int) -> None:
    """A cached answer's reference log-probs must cover its tokens exactly; else the cache belongs to other data."""
    if num_values != num_tokens:
        raise ValueError(
            f"cached reference log-probs hold {num_values} values for an answer of {num_tokens} tokens; the reference "
            "cache does not match this data (delete it to rebuild)."
        )


@dataclass
class Doc:
    """One attention-isolated unit of a row (a shared-prompt pair, or one `[prompt│completion]` sequence)."""

    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    branch_ids: list[int] = field(default_factory=list)
    sequence_index: list[int] = field(default_factory=list)  # -1, or which of the 2B sequences a token belongs to
    ref_logps: list[float] = field(default_factory=list)  # cached reference log-prob of each token (0 off answers)

    def extend(self, ids, positions, branch, index, ref=None) -> None:
        if ref is not None:
            check_reference_length(len(ref), len(ids))
        self.input_ids += ids
        self.position_ids += positions
        self.branch_ids += [branch] * len(ids)
        self.sequence_index += [index] * len(ids)
        self.ref_logps += ref if ref is not None else [0.0] * len(ids)


def truncate(prompt: list[int], completion: list[int], max_length: int | None, mode: str) -> tuple[list, list]:
    """
    TRL's per-sequence truncation of `prompt + completion` to `max_length` (see `DataCollatorForPreference`), returned
    split back into its prompt part and its completion part.
    """
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"Unsupported truncation_mode {mode!r}, expected 'keep_start' or 'keep_end'.")
    excess = 0 if max_length is None else len(prompt) + len(completion) - max_length
    if excess <= 0:
        return prompt, completion
    if mode == "keep_start":
        kept_prompt = prompt[:max_length]
        return kept_prompt, completion[: max_length - len(kept_prompt)]
    return prompt[excess:], completion[max(0, excess - len(prompt)) :]


def sequence_doc(prompt: list[int], completion: list[int], index: int, ref: list[float] | None = None) -> Doc:
    """
    A plain `[prompt│completion]` sequence as its own attention unit. With an empty prompt (none given, or all of it
    truncated away by `keep_end`) the first completion token is context, not an answer token: nothing precedes it,
    so it has no log-prob (in a packed row the previous sequence's last token would "predict" it).
    """
    if not prompt:
        prompt, completion = completion[:1], completion[1:]
    doc = Doc()
    doc.extend(prompt, list(range(len(prompt))), TRUNK, -1)
    doc.extend(completion, list(range(len(prompt), len(prompt) + len(completion))), TRUNK, index, ref)
    return doc


def shared_prompt_doc(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    indices: tuple[int, int],
    refs: tuple[list[float] | None, list[float] | None] = (None, None),
) -> Doc:
    """`[prompt[:-1] │ prompt[-1] chosen │ prompt[-1] rejected]`, positions and branches as in the module docstring."""
    if not prompt:
        raise ValueError("prompt sharing needs at least one prompt token")
    start = len(prompt) - 1
    doc = Doc()
    doc.extend(prompt[:-1], list(range(start)), TRUNK, -1)
    for branch, answer, index, ref in zip((CHOSEN, REJECTED), (chosen, rejected), indices, refs):
        doc.extend(prompt[-1:], [start], branch, -1)
        doc.extend(answer, list(range(start + 1, start + 1 + len(answer))), branch, index, ref)
    return doc


def pair_docs(
    examples: list[dict],
    *,
    share_prompt: bool,
    max_length: int | None,
    truncation_mode: str,
) -> tuple[list[Doc], int]:
    """
    The attention units of a batch of tokenized pairs, and the number of tokens the plain layout would have run (what
    TRL's `num_tokens` counts). Sequence indices follow TRL's order: chosen of pair b is `b`, rejected is `B + b`.

    A pair is shared only if truncation left both sequences the same non-empty prompt (with `keep_end` the two can
    lose different amounts of prompt); otherwise it falls back to two plain sequences, so results never change.
    """
    num_pairs = len(examples)
    docs, plain_tokens = [], 0
    for b, example in enumerate(examples):
        prompt_c, chosen = truncate(example["prompt_ids"], example["chosen_ids"], max_length, truncation_mode)
        prompt_r, rejected = truncate(example["prompt_ids"], example["rejected_ids"], max_length, truncation_mode)
        refs = (example.get("ref_chosen_token_logps"), example.get("ref_rejected_token_logps"))
        plain_tokens += len(prompt_c) + len(chosen) + len(prompt_r) + len(rejected)
        if share_prompt and prompt_c and prompt_c == prompt_r:
            docs.append(shared_prompt_doc(prompt_c, chosen, rejected, (b, num_pairs + b), refs))
        else:
            docs.append(sequence_doc(prompt_c, chosen, b, refs[0]))
            docs.append(sequence_doc(prompt_r, rejected, num_pairs + b, refs[1]))
    return docs, plain_tokens


def rows_from_docs(
    docs: list[Doc], *, num_sequences: int, packing: bool, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """
    Stack docs into right-padded rows: one doc per row, or all docs in one row with `packing`.

    Returns `input_ids`, `position_ids`, `doc_ids` (-1 on padding), `branch_ids`, `sequence_index` (-1 off answers),
    `completion_mask` and `ref_token_logps`, each of shape `(rows, T)`, and `answer_lengths` of shape
    `(num_sequences,)` = `(2B,)`.
    """
    groups = [docs] if packing else [[doc] for doc in docs]
    width = max(sum(len(d.input_ids) for d in group) for group in groups)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    columns = {"input_ids": [], "position_ids": [], "doc_ids": [], "branch_ids": [], "sequence_index": []}
    ref_rows = []
    for group in groups:
        row = {name: [] for name in columns}
        refs = []
        for number, doc in enumerate(group):
            row["input_ids"] += doc.input_ids
            row["position_ids"] += doc.position_ids
            row["doc_ids"] += [number] * len(doc.input_ids)
            row["branch_ids"] += doc.branch_ids
            row["sequence_index"] += doc.sequence_index
            refs += doc.ref_logps
        pad = width - len(row["input_ids"])
        for name, value in (("input_ids", pad_token_id), ("position_ids", 0), ("doc_ids", -1), ("branch_ids", 0)):
            columns[name].append(row[name] + [value] * pad)
        columns["sequence_index"].append(row["sequence_index"] + [-1] * pad)
        ref_rows.append(refs + [0.0] * pad)
    batch = {name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()}
    batch["completion_mask"] = (batch["sequence_index"] >= 0).long()
    # Its length tells 2B without reading `sequence_index` back from the device.
    answers = batch["sequence_index"][batch["sequence_index"] >= 0]
    batch["answer_lengths"] = torch.bincount(answers, minlength=num_sequences)
    batch["ref_token_logps"] = torch.tensor(ref_rows, dtype=torch.float32)
    return batch


def block_attention_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """
    The boolean attention mask (True = may attend) of shape `(rows, 1, T, T)` for `doc_ids`/`branch_ids` of shape
    `(rows, T)`: query i sees key j iff both are in the same doc, j ≤ i, and j is trunk or in i's branch. A padding
    token sees only itself, so no softmax row is empty (an empty row is NaN in SDPA).
    """
    length = doc_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    same_branch = (branch_ids[:, None, :] == TRUNK) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    allowed = same_doc & same_branch & causal & (doc_ids >= 0)[:, :, None]
    allowed |= torch.eye(length, dtype=torch.bool, device=doc_ids.device)
    return allowed[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask → additive bias (0 or the dtype's minimum): what eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def unsupported_reasons(config) -> list[str]:
    """Why a model cannot run the shared-prompt or packed layouts (empty if it can)."""
    reasons = []
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASKABLE_ATTENTION:
        reasons.append(f"attn_implementation {attention!r} takes no custom 4D mask (use one of {MASKABLE_ATTENTION})")
    # A vision-language model's config nests its language model's (layer types, sliding window) in a text config.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = [*(getattr(text, "layer_types", None) or []), *(getattr(text, "layers_block_type", None) or [])]
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if sliding or "sliding_attention" in layer_types:
        reasons.append("the model uses sliding-window attention, which a dense 4D mask would override")
    mixers = sorted(set(layer_types) - MASKED_LAYER_TYPES - {"sliding_attention"})
    if mixers:
        # A recurrent or convolutional layer carries a state along the row whatever the mask says: the rejected branch
        # would read the chosen answer, and a packed sequence the one before it.
        reasons.append(f"the model's {', '.join(mixers)} layers mix tokens without the attention mask")
    return reasons


@dataclass(frozen=True)
class Layout:
    """
    The layout batches run in: `share_prompt` and `packing` as the collator takes them, and, when the layout asked for
    cannot run, which options were `refused` and the `reasons` why (both empty otherwise).
    """

    share_prompt: bool = False
    packing: bool = False
    refused: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    def fallback_message(self) -> str:
        """What is logged when the plain layout runs instead of the one asked for."""
        return f"Plain layout instead of {' + '.join(self.refused)} because {'; '.join(self.reasons)}."


def choose_layout(
    share_prompt: bool,
    packing: bool,
    model_configs: Sequence,
    adapter_configs: Sequence = (),
    *,
    stock_loss: bool = False,
    precompute_ref_log_probs: bool = False,
    compute_metrics: bool = False,
    vision_inputs: bool = False,
) -> Layout:
    """
    The layout that runs: the one asked for (`share_prompt`, `packing`), or the plain one, with the reasons, where the
    models or an option cannot take the shared-prompt or packed layouts.

    Args:
        share_prompt (`bool`), packing (`bool`): the layout asked for (by the config, or by a given collator).
        model_configs (`Sequence[PretrainedConfig]`): the configs of every model that runs (policy and reference);
            see [`unsupported_reasons`].
        adapter_configs (`Sequence[peft.PeftConfig]`): the active adapter configs of those models: a prompt-learning
            adapter prepends virtual tokens, which the layouts' positions and masks do not hold.
        stock_loss (`bool`): TRL's own loss runs, which reads the plain layout.
        precompute_ref_log_probs (`bool`): TRL's precompute pass runs, in the plain layout.
        compute_metrics (`bool`): a `compute_metrics` function reads the plain layout's logits.
        vision_inputs (`bool`): the rows hold images, which TRL's vision collator turns into model inputs beside the
            token ids (`pixel_values`, `image_grid_thw`, `mm_token_type_ids`/`token_type_ids`, ...).

    Returns:
        [`Layout`]: its `reasons` are empty when the layout asked for runs.
    """
    asked = tuple(name for name, on in (("share_prompt", share_prompt), ("packing", packing)) if on)
    reasons = [reason for config in model_configs for reason in unsupported_reasons(config)]
    if stock_loss:
        reasons.append("stock TRL's loss reads the plain layout")
    if precompute_ref_log_probs:
        reasons.append("precompute_ref_log_probs runs TRL's plain-layout reference pass (use ref_cache instead)")
    if compute_metrics:
        reasons.append("compute_metrics needs the plain layout's logits")
    if vision_inputs:
        # The shared-prompt and packed rows carry token ids and positions only: an image's pixels, its place in
        # multimodal RoPE (Qwen-VL's 3D positions) and its bidirectional attention (Gemma 3's token types) would be
        # lost or misplaced, so the log-probs would not be the plain layout's. TRL's vision collator runs instead.
        reasons.append(
            "the rows hold images, whose inputs (pixel_values, image_grid_thw, token type ids) only TRL's vision "
            "collator lays out"
        )
    if any(config.is_prompt_learning for config in adapter_configs):
        reasons.append("prompt-learning adapters prepend virtual tokens")
    if not asked or not reasons:
        return Layout(share_prompt=share_prompt, packing=packing)
    return Layout(refused=asked, reasons=tuple(dict.fromkeys(reasons)))


def layout_configs(models: Sequence[torch.nn.Module]) -> tuple[list, list]:
    """
    The inputs [`choose_layout`] reads from the models that run (each a `PreTrainedModel` or a `PeftModel`, unwrapped
    from accelerate): their model configs, and the configs of their active adapters.
    """
    model_configs = [base_model(model).config for model in models]
    adapter_configs = [model.active_peft_config for model in models if getattr(model, "active_peft_config", None)]
    return model_configs, adapter_configs
