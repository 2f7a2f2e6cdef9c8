"""Run TRL's own `tests/test_dpo_trainer.py` against stock `trl.DPOTrainer` and against `trl_dpo_ext.DPOTrainer`.

Usage:
    python compat/run_trl_dpo_tests.py --trl-checkout PATH [--impl stock ours] [--report FILE] [-k EXPR]

`PATH` is a checkout of the huggingface/trl repository (only its `tests/` folder is read; nothing of it is copied
into this repository). The test file, its `testing_utils.py`, `conftest.py` and `data/` are copied into a work
directory beside a `conftest.py` of ours (`trl_conftest.py`) that, for the `ours` run, rebinds `trl.DPOTrainer` and
`trl.DPOConfig` to this package's before the test module imports them. The Hub models and datasets the tests name are
replaced by local stand-ins (`standins.py`, and `vlm_standins.py` for the vision-language models and image
datasets), filed in a Hugging Face cache so that `from_pretrained` with a Hub id resolves offline
(`HF_HUB_OFFLINE=1`). Only the `Slow` class is deselected (it loads a gated full-size model).

The report lists the counts per run (all tests, and the text-only ones: not in a `VLM`/`Vision` class) and every test
that passes with stock but not with ours, with the first line of its failure.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


HERE = Path(__file__).resolve().parent
TEST_FILE = "test_dpo_trainer.py"
# The Slow class trains a gated full-size model (google/gemma-3n-E2B-it); TRL skips it too without a Hub token.
DESELECT = "not Slow"
# Test classes whose models and datasets are vision-language (their stand-ins are in vlm_standins.py).
VISION_CLASSES = ("VLM", "Vision")


def prepare_workdir(trl_checkout: Path, workdir: Path) -> Path:
    tests = trl_checkout / "tests"
    if not (tests / TEST_FILE).is_file():
        raise SystemExit(f"{trl_checkout} is not a TRL checkout: {tests / TEST_FILE} does not exist.")
    target = workdir / "tests"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "conftest.py", "testing_utils.py", TEST_FILE):
        if (tests / name).is_file():
            shutil.copy2(tests / name, target / name)
    if (tests / "data").is_dir():
        shutil.copytree(tests / "data", target / "data", dirs_exist_ok=True)
    shutil.copy2(HERE / "trl_conftest.py", workdir / "conftest.py")
    return target / TEST_FILE


def run(impl: str, test_file: Path, workdir: Path, hub_cache: Path, select: str, extra: list[str]) -> Path:
    report = workdir / f"junit-{impl}.xml"
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workdir / "modules"),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_DPO_TESTS_IMPL": impl,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(test_file),
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        select,
        f"--junitxml={report}",
        "-o",
        "addopts=",
        *extra,
    ]
    print(f"[{impl}] {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=workdir, env=env, check=False)
    if not report.is_file():
        raise SystemExit(f"[{impl}] pytest wrote no report: it failed before collecting the tests (see above).")
    return report


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """test id → (outcome, first line of the failure or skip message)."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                # Whitespace collapsed: some messages (an ImportError's) start with a line break.
                message = " ".join((element.get("message") or element.text or "").split())[:200]
                break
        results[test_id] = (outcome, message)
    return results


def summarize(results: dict[str, dict[str, tuple[str, str]]], trl_checkout: Path) -> str:
    revision = subprocess.run(
        ["git", "-C", str(trl_checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines = [f"TRL tests from {trl_checkout} (revision {revision or 'unknown'}), `-k '{DESELECT}'`", ""]
    if importlib.util.find_spec("torchvision") is None:
        lines += [
            "torchvision is not installed: transformers builds no Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 or Gemma 4 "
            "processor without it (their video processors need it), so the tests of those models fail with "
            "ImportError (or find no stand-in, Gemma 4) for stock and ours alike.",
            "",
        ]

    def counts(result: dict[str, tuple[str, str]]) -> str:
        tally = {}
        for outcome, _ in result.values():
            tally[outcome] = tally.get(outcome, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))

    for impl, result in results.items():
        text_only = {t: r for t, r in result.items() if not any(c in t.split("::")[0] for c in VISION_CLASSES)}
        lines.append(f"- {impl}: {counts(result)} (text-only tests: {counts(text_only)})")
    if {"stock", "ours"} <= results.keys():
        stock, ours = results["stock"], results["ours"]
        missing = ("missing", "")
        regressions = [t for t, (o, _) in stock.items() if o == "passed" and ours.get(t, missing)[0] != "passed"]
        lines += ["", f"Pass with stock but not with ours: {len(regressions)}"]
        lines += [f"- `{t}`: {ours.get(t, ('missing', ''))[0]}: {ours.get(t, ('', ''))[1]}" for t in regressions]
        stock_fail = [t for t, (o, _) in stock.items() if o in ("failed", "error")]
        lines += ["", f"Fail with stock: {len(stock_fail)}"]
        lines += [f"- `{t}`: {stock[t][1]} (ours: {ours.get(t, ('missing', ''))[0]})" for t in stock_fail]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-checkout", type=Path, required=True, help="a checkout of huggingface/trl")
    parser.add_argument("--impl", nargs="+", default=["stock", "ours"], choices=["stock", "ours"])
    parser.add_argument("--workdir", type=Path, help="where the tests run (a fresh temporary directory by default)")
    parser.add_argument("--report", type=Path, help="also write the summary (markdown) to this file")
    parser.add_argument("-k", dest="select", default="", help="extra pytest -k expression, and-ed with the default")
    args, extra = parser.parse_known_args()

    sys.path.insert(0, str(HERE))
    import standins

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trl-dpo-tests-"))
    test_file = prepare_workdir(args.trl_checkout, workdir)
    hub_cache = standins.build_hub_cache(workdir / "hub")
    select = f"({DESELECT}) and ({args.select})" if args.select else DESELECT
    results = {impl: outcomes(run(impl, test_file, workdir, hub_cache, select, extra)) for impl in args.impl}
    summary = summarize(results, args.trl_checkout)
    print(summary)
    if args.report:
        args.report.write_text(summary)


if __name__ == "__main__":
    main()
