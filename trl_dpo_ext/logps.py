"""Per-sequence log-probabilities of the answers, from one forward, whatever the layout.

In every layout of `layout.py` the label of position t is token t+1 of the same row, so one shifted forward scores all
answers; `sequence_index` says which of the 2B answers each label belongs to. Which LM head scores them is decided
here, once (`completion_token_logps`):

- the plain layout: TRL's fused head (`trl.trainer.utils.add_fused_lm_head`, installed by `trl.DPOTrainer`), as stock
  TRL runs it, so the plain layout matches stock TRL bit for bit;
- the shared-prompt and packed layouts keep only the answer positions (`_answer_positions_only`); on an accelerator
  TRL's fused head scores them, in tiles, never materializing the `(positions, vocab)` logits; on the CPU
  (`model_head_scores`) the model's own head does, followed by `head_statistics`: off CUDA/XPU TRL's tiles fall back
  to a dozen torch passes over each tile, taking 1.3–1.7× the time of this head for the policy and 1.5–2.4× for the
  reference (`benchmarks/lm_head_cpu.py`), and host memory holds those logits.
"""

import contextlib
from dataclasses import dataclass

import pyarrow as pa
import torch

from .layout import additive_mask, block_attention_mask
from .models import base_model
from .private_api import FUSED_HEAD_OUTPUTS


# Batch keys that describe the layout or carry precomputed values; everything else goes to the model.
NON_MODEL_KEYS = frozenset(
    {
        "completion_mask",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "ref_token_logps",
        "doc_ids",
        "branch_ids",
        "sequence_index",
        "num_tokens",
        "answer_lengths",
        "example_index",
    }
)


@dataclass
class TokenLogps:
    """
    Next-token statistics of one forward, aligned with `input_ids[:, 1:]`.

    Attributes:
        logps (`torch.Tensor` of shape `(rows, T-1)`): log p(x_{t+1} | context of x_{t+1}); 0 off the answers.
        index (`torch.Tensor` of shape `(rows, T-1)`): which answer x_{t+1} belongs to: b for the chosen answer of pair
            b, B + b for its rejected one, -1 if it is no answer token.
        num_sequences (`int`): 2B.
        one_per_row (`bool`): the plain layout, where row r is answer r.
        entropy, mean_logits, is_top1 (`torch.Tensor` of shape `(rows, T-1)`, *optional*): extra fused-head outputs.
    """

    logps: torch.Tensor
    index: torch.Tensor
    num_sequences: int
    one_per_row: bool = False
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """1.0 on answer tokens, shape `(rows, T-1)`."""
        return (self.index >= 0).to(self.logps.dtype)

    def chosen_mask(self) -> torch.Tensor:
        return ((self.index >= 0) & (self.index < self.num_sequences // 2)).to(self.logps.dtype)

    def rejected_mask(self) -> torch.Tensor:
        return (self.index >= self.num_sequences // 2).to(self.logps.dtype)

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of a per-token quantity over each answer, shape `(2B,)`: chosen answers first, then rejected ones."""
        if self.one_per_row:  # TRL's own reduction, so the plain layout matches stock TRL bit for bit
            return (values * self.mask).sum(dim=1)
        # Masking instead of boolean indexing: no host-device sync, so the GPU never waits for the CPU here.
        totals = values.new_zeros(self.num_sequences)
        return totals.index_add(0, self.index.clamp(min=0).flatten(), (values * self.mask).flatten())

    def sequence_logps(self) -> torch.Tensor:
        """log π(y|x) = Σ_t log p over answer tokens, shape `(2B,)` (Rafailov et al. 2023, Eq. 7)."""
        return self.per_sequence(self.logps)

    def lengths(self) -> torch.Tensor:
        """Answer lengths in tokens, shape `(2B,)`."""
        return self.per_sequence(self.mask)

    def answer_values(self) -> "AnswerLogps":
        """Per-token log-probs of each of the 2B answers, in token order (what the reference cache stores)."""
        selected = self.index >= 0
        flat_index = self.index[selected]
        order = torch.sort(flat_index, stable=True).indices  # row-major order within an answer is token order
        values = self.logps[selected][order].float().cpu()
        counts = torch.bincount(flat_index, minlength=self.num_sequences).cpu()
        return AnswerLogps(values, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


class AnswerLogps:
    """
    Per-token log-probs of N answers, stored flat: answer i is `values[offsets[i]:offsets[i + 1]]`.

    What the reference cache holds for a whole dataset: one float32 per answer token and one int64 per answer, never
    a Python float per token (~32 bytes each as a list; ~10⁸ of them for a real preference set).

    Args:
        values (`torch.Tensor`): float32, shape `(T,)`: every answer's tokens, answer after answer.
        offsets (`torch.Tensor`): int64, shape `(N + 1,)`, starting at 0 and ending at T.
    """

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor):
        self.values = values.to(torch.float32)
        self.offsets = offsets.to(torch.int64)

    @classmethod
    def from_lists(cls, answers: list[list[float]]) -> "AnswerLogps":
        lengths = torch.tensor([len(answer) for answer in answers], dtype=torch.int64)
        values = torch.tensor([v for answer in answers for v in answer], dtype=torch.float32)
        return cls(values, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, answers: slice) -> "AnswerLogps":
        """Answers `answers` (a slice with step 1), e.g. the chosen half of a batch's 2B."""
        first, last, step = answers.indices(len(self))
        if step != 1:
            raise ValueError("AnswerLogps takes slices with step 1.")
        offsets = self.offsets[first : max(first, last) + 1]
        return AnswerLogps(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnswerLogps):
            return NotImplemented
        return torch.equal(self.offsets, other.offsets) and torch.equal(self.values, other.values)

    def tolist(self) -> list[list[float]]:
        return [chunk.tolist() for chunk in self.values.split(self.offsets.diff().tolist())]

    def arrow(self):
        """The answers as an Arrow list column, sharing the tensors' memory: what `Dataset.add_column` takes."""
        return pa.LargeListArray.from_arrays(pa.array(self.offsets.numpy()), pa.array(self.values.numpy()))


class AnswerLogpsBuffer:
    """
    [`AnswerLogps`] of a whole dataset, filled batch by batch into two tensors allocated once.

    Why not one small tensor per batch, concatenated at the end: those small tensors, live between each batch's large
    transient ones, keep glibc from returning the heap to the system, so the reference pass's resident memory grew by
    ~50 KB per pair (measured at 10k pairs; #28), not by the 4 bytes per token the values take.

    Args:
        num_answers (`int`): how many answers will be appended in all.
        max_tokens (`int`): a bound on their tokens (e.g. the tokenized answers' lengths, before truncation).
    """

    def __init__(self, num_answers: int, max_tokens: int):
        self.values = torch.empty(max_tokens, dtype=torch.float32)
        self.offsets = torch.zeros(num_answers + 1, dtype=torch.int64)
        self.num_appended = 0

    def append(self, part: AnswerLogps) -> None:
        first, last = self.num_appended, self.num_appended + len(part)
        start = int(self.offsets[first])
        end = start + part.values.numel()
        if last >= self.offsets.numel() or end > self.values.numel():
            raise ValueError(
                f"{last} answers of {end} tokens appended to a buffer for {self.offsets.numel() - 1} answers of at "
                f"most {self.values.numel()} tokens."
            )
        self.values[start:end] = part.values
        self.offsets[first + 1 : last + 1] = part.offsets[1:] + start
        self.num_appended = last

    def answers(self) -> AnswerLogps:
        """
        The answers appended, all of them: the buffer itself when they filled it, else a copy of what they filled (the
        bound was above their tokens, e.g. truncated answers: the unused tail is not kept alive for the whole run).
        """
        if self.num_appended != self.offsets.numel() - 1:
            raise ValueError(f"{self.num_appended} answers appended to a buffer for {self.offsets.numel() - 1}.")
        used = int(self.offsets[-1])
        values = self.values if used == self.values.numel() else self.values[:used].clone()
        return AnswerLogps(values, self.offsets)


def sequence_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
    """The batch's `sequence_index`, 2B, and whether it is the plain layout (derived from `completion_mask` there)."""
    if "sequence_index" in batch:
        return batch["sequence_index"], batch["answer_lengths"].size(0), False
    completion_mask = batch["completion_mask"]
    rows = torch.arange(completion_mask.size(0), device=completion_mask.device)[:, None]
    return torch.where(completion_mask.bool(), rows, -1), completion_mask.size(0), True


def cached_reference_logps(batch: dict[str, torch.Tensor]) -> TokenLogps:
    """Reference log-probs read from the batch (from the reference cache): no forward at all."""
    index, num_sequences, one_per_row = sequence_index(batch)
    return TokenLogps(batch["ref_token_logps"][:, 1:], index[:, 1:], num_sequences, one_per_row)


def completion_token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], statistics: bool = True
) -> TokenLogps:
    """
    Run `model` on a collated batch (any layout of `PreferenceCollator`) and return the log-prob of every answer token.

    Args:
        model: a causal LM (optionally wrapped by peft / accelerate); the plain layout, and the other layouts off the
            CPU, need it patched with TRL's fused LM head (`trl.DPOTrainer` does that).
        batch: `input_ids`, `completion_mask`, `position_ids` of shape `(rows, T)`, and either a 2D `attention_mask`
            (plain layout) or `doc_ids`/`branch_ids` (shared-prompt / packed layouts, turned into a 4D mask here).
        statistics: also return the per-token entropy, mean logit and top-1 flag (the policy's metrics). The
            reference's are never read: without them the CPU head skips their passes over the vocabulary.
    """
    model_kwargs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    index, num_sequences, one_per_row = sequence_index(batch)
    if one_per_row:
        labels = batch["input_ids"].masked_fill(index < 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = index.size(1) - 1
        # Prompt-learning adapters prepend virtual tokens; keep the positions of the real ones.
        per_token = {name: _tail(getattr(outputs, name, None), seq_len) for name in FUSED_HEAD_OUTPUTS}
    else:
        model_kwargs["attention_mask"] = _layout_mask(model, batch["doc_ids"], batch["branch_ids"])
        answers = index[:, 1:] >= 0
        targets = batch["input_ids"][:, 1:][answers]
        with _answer_positions_only(model, answers):
            if model_head_scores(answers.device):
                kept = head_statistics(model(**model_kwargs).logits[0], targets, statistics)
            else:  # pre-shifted labels: scored as given, one per kept position
                outputs = model(**model_kwargs, shift_labels=targets[None], fused_lm_head=True)
                kept = {name: _first_row(getattr(outputs, name, None)) for name in FUSED_HEAD_OUTPUTS}
        per_token = {name: _scatter(kept.get(name), answers) for name in FUSED_HEAD_OUTPUTS}
    return TokenLogps(
        logps=per_token["log_probs"],
        index=index[:, 1:],
        num_sequences=num_sequences,
        one_per_row=one_per_row,
        entropy=per_token["entropy"],
        mean_logits=per_token["mean_logits"],
        is_top1=per_token["is_top1"],
    )


def model_head_scores(device: torch.device) -> bool:
    """Whether the model's own LM head scores the kept answer positions (on the CPU) rather than TRL's fused head."""
    return device.type == "cpu"


def head_statistics(logits: torch.Tensor, targets: torch.Tensor, statistics: bool = True) -> dict[str, torch.Tensor]:
    """
    What TRL's fused head returns per position, from materialized logits: log p(target) = z_target − log Σ_v exp z_v
    and, with `statistics`, the entropy −Σ_v p_v log p_v, the mean logit and whether the target is the first argmax
    (TRL's `is_top1`: a tie with an earlier token does not count). Only the log-probs carry gradients.

    Args:
        logits (`torch.Tensor` of shape `(positions, vocab)`): the LM head's output (its own scaling included).
        targets (`torch.Tensor` of shape `(positions,)`): the next token of each position.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    out = {"log_probs": logits.gather(-1, targets[:, None])[:, 0] - log_z}
    if statistics:
        with torch.no_grad():
            probs = torch.exp(logits - log_z[:, None])
            out["entropy"] = log_z - (probs * logits).sum(-1)
            out["mean_logits"] = logits.mean(-1)
            out["is_top1"] = logits.argmax(-1) == targets
    return out


@contextlib.contextmanager
def _answer_positions_only(model: torch.nn.Module, answers: torch.Tensor):
    """
    Within: the backbone's `last_hidden_state` holds only the positions where `answers` (shape `(rows, T-1)`, aligned
    with `input_ids[:, 1:]`) is True, as one row `(1, A, hidden)` in row-major order.

    Why: the head then projects those positions alone, whichever head runs. Off CUDA/XPU, TRL's fused head would
    project every position through the vocabulary (its tiles keep a fixed shape for compiled devices), prompt and
    padding included: in a prompt-heavy batch ~4 of 5 of that work is discarded. On CUDA TRL keeps the same positions
    itself, in the same order, so there the head's inputs are unchanged.
    """
    backbone = base_model(model).base_model

    def keep_answers(module, args, output):
        output.last_hidden_state = output.last_hidden_state[:, :-1][answers][None]
        return output

    handle = backbone.register_forward_hook(keep_answers)
    try:
        yield
    finally:
        handle.remove()


def _tail(values: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    return None if values is None else values[:, -seq_len:]


def _first_row(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values[0]


def _scatter(values: torch.Tensor | None, answers: torch.Tensor) -> torch.Tensor | None:
    """`(A,)` values of the kept positions back to `(rows, T-1)`, zeros elsewhere (as TRL's head returns them)."""
    return None if values is None else values.new_zeros(answers.shape).masked_scatter(answers, values)


def _layout_mask(model: torch.nn.Module, doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    # SDPA takes the boolean mask as is; eager attention adds its mask to the scores, so it needs the additive form.
    mask = block_attention_mask(doc_ids, branch_ids)
    base = base_model(model)
    if base.config._attn_implementation == "eager":
        return additive_mask(mask, base.get_input_embeddings().weight.dtype)
    return mask
