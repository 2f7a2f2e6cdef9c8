"""Per-sequence log-probs: equal to a plain log-softmax computation, and independent of the padding side."""

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, sequence_logps_tol
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_dpo_ext import PreferenceCollator
from trl_dpo_ext.logps import completion_token_logps


def rows(tokenizer, pairs):
    out = []
    for row in pairs:
        out.append(
            {
                "prompt_ids": tokenizer(row["prompt"]).input_ids,
                "chosen_ids": tokenizer(row["chosen"]).input_ids,
                "rejected_ids": tokenizer(row["rejected"]).input_ids,
            }
        )
    return out


@pytest.fixture
def model(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def reference_sequence_logps(model, row_prompt, row_completion):
    """log π(y|x) from full logits, one unpadded sequence at a time."""
    ids = torch.tensor([row_prompt + row_completion])
    logits = model(ids).logits[0, :-1]
    logps = F.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(row_prompt) - 1 :].sum().item()


@pytest.mark.numerics
@torch.no_grad()
def test_sequence_logps_match_unpadded_log_softmax(model, tokenizer, pairs):
    examples = rows(tokenizer, pairs)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    logps = completion_token_logps(model, batch)
    want = [reference_sequence_logps(model, e["prompt_ids"], e["chosen_ids"]) for e in examples]
    want += [reference_sequence_logps(model, e["prompt_ids"], e["rejected_ids"]) for e in examples]
    want = torch.tensor(want)
    tol = sequence_logps_tol(want, logps.lengths(), model.config, batch["input_ids"].size(1))
    assert_within(logps.sequence_logps(), want, tol, "fused head vs full log-softmax")  # fp32 rounding, per answer


@pytest.mark.numerics
@torch.no_grad()
def test_left_and_right_padding_give_the_same_logps(model, tokenizer, pairs):
    examples = rows(tokenizer, pairs)
    batch = PreferenceCollator(pad_token_id=0)(examples)
    right = completion_token_logps(model, batch)
    left = completion_token_logps(model, PreferenceCollator(pad_token_id=0, padding_side="left")(examples))
    tol = sequence_logps_tol(right.sequence_logps(), right.lengths(), model.config, batch["input_ids"].size(1))
    assert_within(left.sequence_logps(), right.sequence_logps(), tol, "left vs right padding")  # fp32 rounding
    torch.testing.assert_close(left.lengths(), right.lengths())  # token counts: exact
