"""`trl-dpo-ext merge`: the merged model computes what the adapter model does, and loads without peft or bitsandbytes.

Tolerances on the logits: for an fp32 merge, the forward's fp32 rounding relative to the largest logit (only the order
of float operations differs from the adapter model's `W·x + B·A·x`; tests/numerics.py), the adapter model kept on
bitsandbytes' fp32 path on every CPU; 2e-2 for bf16 (8-bit mantissa weights).
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from numerics import assert_effect, assert_within, forward_rtol, fp32_4bit_kernels
from peft import PeftModel
from recipe_run import trained_run
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from trl_dpo_ext import merge_adapter
from trl_dpo_ext.cli import main as cli


BF16_TOLERANCE = 2e-2
TEXT = "User: Is the Atlas kayak worth buying?\nAssistant: Sure! The Atlas kayak is sturdy and quiet."

# Runs in a fresh interpreter where peft and bitsandbytes cannot be imported (None in sys.modules: import fails and
# transformers sees them as absent).
LOAD_WITHOUT_PEFT_OR_BNB = """
import sys
sys.modules.update({"peft": None, "bitsandbytes": None})
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter_logits(run):
    """Logits of the adapter model: LoRA (fp32) on the 4-bit base, which computes with the dequantized weights."""
    saved = json.loads((run.output_dir / "dpo_config.json").read_text())
    base_path = json.loads((run.output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=BitsAndBytesConfig.from_dict(saved["quantization_config"]), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(fp32_4bit_kernels(base), run.output_dir).eval()
    ids = AutoTokenizer.from_pretrained(run.output_dir)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        with model.disable_adapter():
            moved = (logits - model(ids).logits).abs().max().item()
    # the adapter changes the outputs, far beyond the fp32 merge's rounding
    assert_effect(moved, fp32_tolerance(model.config, logits), what="adapter vs base logits")
    return logits


def fp32_tolerance(config, logits):
    """fp32 rounding of the logits, relative to the largest one, for one more rounding per merged weight W + B·A."""
    return (forward_rtol(config, logits.size(1), lora_r=16) + 2 * 2**-24) * logits.abs().max().item()


def test_fp32_merge_matches_the_adapter_model_and_loads_without_peft_or_bnb(run, adapter_logits, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(run.output_dir), "--out", str(out), "--dtype", "fp32"]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k or "absmax" in k or "quant" in k]
    logits_file = tmp_path / "logits.pt"
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT_OR_BNB, str(out), TEXT, str(logits_file)], check=True, timeout=300
    )
    merged_logits = torch.load(logits_file)
    assert merged_logits.shape == adapter_logits.shape
    tol = fp32_tolerance(SimpleNamespace(**config), adapter_logits)
    assert_within(merged_logits, adapter_logits, tol, "merged vs adapter logits")  # fp32 rounding, relative to max


def test_bf16_merge(run, adapter_logits, tmp_path):
    out = merge_adapter(run.output_dir, tmp_path / "merged", dtype="bf16")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert (logits - adapter_logits).abs().max().item() < BF16_TOLERANCE


def test_refuses_a_non_empty_out_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["merge", "--adapter", str(run.output_dir), "--out", str(out)]) == 2  # a user error: one line
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        cli(["--debug", "merge", "--adapter", str(run.output_dir), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is the adapter directory"):
        merge_adapter(run.output_dir, run.output_dir, overwrite=True)
    merge_adapter(run.output_dir, out, dtype="fp32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind
