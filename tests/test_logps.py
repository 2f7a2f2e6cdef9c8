"""Per-sequence log-probs: equal to a plain log-softmax computation, independent of the padding side; the CPU head."""

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, forward_rtol, sequence_logps_tol, sum_rtol
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_dpo_ext import PreferenceCollator
from trl_dpo_ext import logps as logps_module
from trl_dpo_ext.logps import AnswerLogps, AnswerLogpsBuffer, completion_token_logps, head_statistics


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


# ---------------------------------------------------------------------------------------------------------------------
# The CPU head of the shared-prompt and packed layouts (`logps.head_statistics`) against TRL's fused head.


@pytest.mark.numerics
def test_cpu_head_gives_the_fields_of_trls_fused_head(model, tokenizer, pairs):
    ids = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(rows(tokenizer, pairs))["input_ids"]
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)  # TRL's tiles, every position
        logits = model(input_ids=ids).logits[:, :-1]
    got = head_statistics(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    rtol = forward_rtol(model.config, ids.size(1))  # the same math in another order: fp32 rounding (numerics.py)
    for field in ("log_probs", "entropy"):
        want = getattr(fused, field).reshape(-1)
        assert_within(got[field], want, rtol * want.abs(), field)
    # Σ_v z_v / V: each logit within rtol of its own size, then V terms summed in another order.
    scale = logits.abs().mean(-1).reshape(-1)
    assert_within(
        got["mean_logits"], fused.mean_logits.reshape(-1), (rtol + sum_rtol(logits.size(-1))) * scale, "mean"
    )
    # The first argmax, where the two largest logits are further apart than the rounding could move them.
    top2 = logits.reshape(-1, logits.size(-1)).topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * rtol * top2.abs().max(-1).values
    assert clear.sum() > len(clear) // 2
    assert torch.equal(got["is_top1"][clear], fused.is_top1.reshape(-1)[clear])
    assert got["is_top1"].any() and not got["is_top1"].all()


def test_cpu_head_grads_flow_through_the_log_probs_only():
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])
    out = head_statistics(logits, targets)
    assert out["log_probs"].requires_grad
    assert not any(out[name].requires_grad for name in ("entropy", "mean_logits", "is_top1"))
    # d log p_t / dz_v = 1[v = t] − p_v, by hand
    out["log_probs"].sum().backward()
    want = F.one_hot(targets, 11).float() - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, want)
    assert head_statistics(logits, targets, statistics=False).keys() == {"log_probs"}


def test_cpu_head_projects_the_answer_positions_once(model, tokenizer, pairs):
    # On the CPU the shared-prompt layout scores through the model's own `lm_head` (TRL's fused head reads the weight
    # and never calls the module): one call, one row per answer token, prompts and padding never projected.
    heights = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: heights.append(args[0].shape[:-1]))
    try:
        with torch.no_grad():
            batch = PreferenceCollator(pad_token_id=0, share_prompt=True)(rows(tokenizer, pairs))
            logps = completion_token_logps(model, batch)
    finally:
        handle.remove()
    assert heights == [(1, int(logps.lengths().sum()))]
    assert batch["input_ids"].size(1) > 1 and heights[0][1] < batch["input_ids"].numel()


@pytest.mark.numerics
@pytest.mark.parametrize("share_prompt, packing", [(True, False), (True, True)])
def test_accelerator_path_gives_what_the_cpu_head_gives(model, tokenizer, pairs, monkeypatch, share_prompt, packing):
    # The branch that runs on CUDA (TRL's fused head on the kept positions), forced here on the CPU.
    batch = PreferenceCollator(pad_token_id=0, share_prompt=share_prompt, packing=packing)(rows(tokenizer, pairs))
    with torch.no_grad():
        cpu = completion_token_logps(model, batch)
        monkeypatch.setattr(logps_module, "model_head_scores", lambda device: False)
        fused = completion_token_logps(model, batch)
    tol = sequence_logps_tol(fused.sequence_logps(), fused.lengths(), model.config, batch["input_ids"].size(1))
    assert_within(cpu.sequence_logps(), fused.sequence_logps(), tol, "log-probs")  # fp32 rounding, per answer
    rtol = forward_rtol(model.config, batch["input_ids"].size(1))
    assert_within(cpu.entropy, fused.entropy, rtol * fused.entropy.abs(), "entropy")
    assert torch.equal(cpu.index, fused.index) and cpu.is_top1.dtype == fused.is_top1.dtype == torch.bool
    assert torch.equal(cpu.is_top1 & (cpu.index < 0), torch.zeros_like(cpu.is_top1))  # off the answers: False


def test_answer_logps_hold_answers_flat_and_slice_and_convert_exactly():
    answers = [[-1.5, -0.25], [], [-3.0], [-2.0, -0.5, -0.125]]
    flat = AnswerLogps.from_lists(answers)
    assert flat.values.dtype == torch.float32 and flat.offsets.tolist() == [0, 2, 2, 3, 6]
    assert len(flat) == 4 and flat.tolist() == answers  # float32-exact values
    assert flat[1:3].tolist() == [[], [-3.0]] and flat[1:3].offsets.tolist() == [0, 0, 1]
    assert flat != AnswerLogps.from_lists(answers[:3] + [[-2.0, -0.5, -0.25]])
    # The Arrow column a dataset gets shares the tensors' buffer: no copy, no Python float per token.
    column = flat.arrow()
    assert column.to_pylist() == answers
    assert column.values.buffers()[1].address == flat.values.data_ptr()


def test_answer_logps_buffer_fills_one_allocation_batch_by_batch_and_refuses_more_than_it_holds():
    flat = AnswerLogps.from_lists([[-1.5, -0.25], [], [-3.0], [-2.0, -0.5, -0.125]])
    for bound in (6, 8):  # the answers' tokens exactly, or above them (truncated answers)
        buffer = AnswerLogpsBuffer(num_answers=4, max_tokens=bound)
        storage = buffer.values.data_ptr()
        for part in (flat[:1], flat[1:3], flat[3:]):
            buffer.append(part)
        answers = buffer.answers()
        assert answers == flat and answers.values.numel() == 6
        # filled: the buffer itself, no copy; not filled: a copy of the filled part, the buffer is not kept alive
        assert (answers.values.data_ptr() == storage) == (bound == 6)
    empty = AnswerLogpsBuffer(num_answers=0, max_tokens=0)
    assert empty.answers() == AnswerLogps.from_lists([]) and empty.answers().tolist() == []
    with pytest.raises(ValueError, match="4 answers of 6 tokens appended to a buffer for 3 answers"):
        AnswerLogpsBuffer(num_answers=3, max_tokens=8).append(flat)
    with pytest.raises(ValueError, match="for 4 answers of at most 5 tokens"):
        AnswerLogpsBuffer(num_answers=4, max_tokens=5).append(flat)
    with pytest.raises(ValueError, match="1 answers appended to a buffer for 4"):
        partial = AnswerLogpsBuffer(num_answers=4, max_tokens=8)
        partial.append(flat[:1])
        partial.answers()
