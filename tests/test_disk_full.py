"""A full disk (ENOSPC) at each write: a checkpoint mid-training, the final adapter, the model card, the reference
cache and the pairs file. Each failure names the path and says the disk is full (a command: one `error:` line,
status 2); nothing half-written is left that a later run would take as complete; the previous checkpoint stays and
resumes.

The disk fills up half-way through a real write, in whatever library makes it: `FullDisk` below. A real full
filesystem (a small tmpfs in a user and mount namespace, where the kernel allows one without root) checks that the
errors it injects are those a full disk raises.
"""

import builtins
import errno
import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import PAIRS
from cpu_settings import CPU_ARGS
from datasets import Dataset
from peft import LoraConfig
from safetensors import safe_open
from transformers import TrainerCallback

from trl_dpo_ext import DPOConfig, DPOTrainer, cli, load_qlora_model
from trl_dpo_ext.checkpoints import checkpoint_problem, resolve_resume
from trl_dpo_ext.errors import DiskFullError, exit_status_of
from trl_dpo_ext.logps import AnswerLogps
from trl_dpo_ext.refcache import load_reference_cache, save_reference_cache


ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
FULL = "the disk is full (No space left on device)"
NOT_WRITTEN = "it was not written (an earlier version, if any, is unchanged)."  # what an atomic write adds
# What each writing library raises on a real full disk (checked by `test_injected_errors_are_those_of_a_full_disk`).
TORCH_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos {} vs {}"
SAFETENSORS_ERROR = f"Error while serializing: I/O error: {ENOSPC} (os error 28)"


class _Writer:
    """A file opened for writing on a `FullDisk`: each write takes its bytes from the space left."""

    def __init__(self, handle, disk: "FullDisk", path: str):
        self._handle, self._disk, self._path = handle, disk, path

    def write(self, data):
        fits = self._disk.take(self._path, len(data))
        if fits < len(data):
            self._handle.write(data[:fits])  # a write that fills the disk writes what fits, then fails
            self._handle.flush()
            raise OSError(errno.ENOSPC, ENOSPC)  # as the kernel's error reaches Python: no file name
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


class FullDisk:
    """
    The filesystem under `root` fills up `keep` bytes into the `nth` file whose name matches `pattern` (fnmatch): that
    write stops half-way, leaving those bytes on disk, with the error its library raises on a real full disk, and
    every later write under `root` fails at its first byte, until `free()`. Covered: Python files (`open`, `io.open`,
    `os.fdopen`: json, the model card, our atomic writes, datasets' and pyarrow's writers), `torch.save` to a path
    (C++: transformers' optimizer, scheduler, RNG and training-args files; it leaves the bytes that fit) and
    safetensors' `serialize_file` (Rust: the adapter weights; it leaves no file); once full, `os.statvfs` (and so
    `shutil.disk_usage`) reports no space left. Not covered: tokenizers' Rust `save` of tokenizer.json, which writes
    on as if there were space.
    """

    def __init__(self, monkeypatch, root: Path, pattern: str, keep: int = 512, nth: int = 1):
        self.root, self.pattern, self.keep, self.nth = Path(root).resolve(), pattern, keep, nth
        self.matched, self.left = 0, None  # bytes left on the disk; None: plenty
        self.written: list[str] = []  # files opened for writing under root, in order
        self.failed: list[str] = []  # the files whose write found the disk full
        real_open, real_fdopen, real_save, real_statvfs = builtins.open, os.fdopen, torch.save, os.statvfs
        real_serialize_file = safetensors.torch.serialize_file

        def opened(handle, path):
            if self._opens(path):
                return _Writer(handle, self, str(path))
            return handle

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writes = isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+")
            return opened(handle, file) if writes else handle

        def fdopen(fd, mode="r", *args, **kwargs):
            handle = real_fdopen(fd, mode, *args, **kwargs)
            writes = isinstance(fd, int) and set(mode) & set("wax+")
            return opened(handle, os.readlink(f"/proc/self/fd/{fd}")) if writes else handle

        def partial_write(path, data: bytes) -> bool:
            fits = self.take(path, len(data))
            with real_open(path, "wb") as handle:
                handle.write(data[:fits])
            return fits < len(data)

        def save(obj, f, *args, **kwargs):
            if not (isinstance(f, (str, os.PathLike)) and self._opens(f)):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            if partial_write(f, buffer.getvalue()):
                raise RuntimeError(TORCH_ERROR.format(os.path.getsize(f), len(buffer.getvalue())))

        def serialize_file(tensors, filename, metadata=None):
            if not self._opens(filename):
                return real_serialize_file(tensors, filename, metadata=metadata)
            if partial_write(filename, safetensors.torch.serialize(tensors, metadata=metadata)):
                os.unlink(filename)  # safetensors 0.8 removes what it wrote (checked on a real full disk below)
                raise safetensors.SafetensorError(SAFETENSORS_ERROR)

        def statvfs(path):
            result = real_statvfs(path)
            if self.left != 0 or not self._under(path):
                return result
            return os.statvfs_result((*result[:3], 0, 0, *result[5:]))

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
        monkeypatch.setattr(os, "statvfs", statvfs)

    def _under(self, path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(self.root)

    def _opens(self, path) -> bool:
        """Whether a file opened for writing at `path` is on this disk; the `nth` match starts filling it."""
        if not self._under(path):
            return False
        self.written.append(str(path))
        if self.left is None and fnmatch.fnmatch(Path(path).name, self.pattern):
            self.matched += 1
            if self.matched == self.nth:
                self.left = self.keep
        return True

    def take(self, path, size: int) -> int:
        """How many of `size` bytes written to `path` fit on the disk."""
        if self.left is None:
            return size
        fits = min(size, self.left)
        self.left -= fits
        if fits < size:
            self.failed.append(str(path))
        return fits

    def free(self) -> None:
        """Space again (the user deleted something): no write fails from here on."""
        self.left, self.pattern = None, ""


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def raising(error: BaseException):
    raise error


class StepsRun(TrainerCallback):
    def __init__(self, steps: list[int]):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def make_trainer(tiny_dir, tokenizer, output_dir: Path, **overrides) -> DPOTrainer:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = load_qlora_model(tiny_dir, lora, compute_dtype="float32")
    settings = {**CPU_ARGS, "save_strategy": "steps", "save_steps": 1, "max_steps": 2, "save_metrics_plot": False}
    args = DPOConfig(output_dir=str(output_dir), **{**settings, **overrides})
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)


@pytest.fixture(scope="module")
def failed_run(tiny_dir, tokenizer, tmp_path_factory):
    """
    Training (2 steps, a checkpoint each) whose disk fills up half-way through checkpoint-2's `optimizer.pt` (torch's
    C++ writer), after a complete checkpoint-1; the trainer is then what the save tests below write from.
    """
    out = tmp_path_factory.mktemp("run") / "out"
    trainer = make_trainer(tiny_dir, tokenizer, out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        disk = FullDisk(monkeypatch, out.parent, "optimizer.pt", nth=2)
        with pytest.raises(DiskFullError) as error:
            trainer.train()
    return SimpleNamespace(trainer=trainer, out=out, error=error.value, failed=disk.failed)


def test_a_full_disk_mid_training_keeps_the_previous_checkpoint_and_resumes_from_it(
    failed_run, tiny_dir, tokenizer, capsys, caplog
):
    out = failed_run.out
    assert failed_run.failed == [str(out / "checkpoint-2" / "optimizer.pt")]
    message = (
        f"{out / 'checkpoint-2'}: {FULL}: the checkpoint was not saved; the partly written checkpoint was removed. "
        f"The newest complete checkpoint, {out / 'checkpoint-1'}, is intact: free space and run the same command "
        "with `--resume_from_checkpoint last` to continue from it."
    )
    assert str(failed_run.error) == message
    assert exit_status_of(raising, failed_run.error) == 2  # how `trl-dpo-ext dpo` and the recipe end on it
    assert one_error_line(capsys) == f"error: {message}"
    assert not (out / "checkpoint-2").exists()
    assert checkpoint_problem(out / "checkpoint-1") is None
    before = digests(out / "checkpoint-1")

    resumed, steps = make_trainer(tiny_dir, tokenizer, out), []
    resumed.add_callback(StepsRun(steps))
    with caplog.at_level("INFO", logger="trl_dpo_ext.checkpoints"):
        resumed.train(resume_from_checkpoint="last")
    assert f"Resuming from {out / 'checkpoint-1'}" in caplog.text
    assert steps == [2]  # only the step whose checkpoint was lost
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert digests(out / "checkpoint-1") == before


@pytest.mark.parametrize(
    "pattern, named",
    [
        ("adapter_model.safetensors", False),  # peft, through safetensors' Rust writer
        ("adapter_config.json", False),  # peft, Python's open
        (".dpo_config.json.*", True),  # ours, atomic (through a temp file): the error names it
        ("rng_state.pth", False),  # transformers, torch.save
        ("trainer_state.json", False),  # transformers, the last file: a checkpoint is complete only with it
    ],
)
def test_a_checkpoint_is_never_left_half_written(failed_run, monkeypatch, pattern, named):
    trainer, out = failed_run.trainer, failed_run.out
    last = resolve_resume("last", out)
    step = trainer.state.global_step = 10 + len(list(out.iterdir()))  # a new checkpoint per case
    folder = out / f"checkpoint-{step}"
    before = digests(Path(last))
    disk = FullDisk(monkeypatch, out, pattern)
    with pytest.raises(DiskFullError) as error:
        trainer._save_checkpoint(trainer.model, None)
    (failed,) = disk.failed
    assert Path(failed).parent == folder and fnmatch.fnmatch(Path(failed).name, pattern)
    message = str(error.value)
    assert message.startswith(f"{folder}: {FULL}: the checkpoint was not saved")
    assert (f"({folder / 'dpo_config.json'})" in message) == named
    assert f"The newest complete checkpoint, {last}, is intact" in message
    assert not folder.exists()  # removed: it held only this save's files, and the space is needed
    disk.free()
    assert resolve_resume("last", out) == last and digests(Path(last)) == before


def adapter_loads(directory: Path) -> bool:
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(directory))
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as saved:
            return len(list(saved.keys())) > 0
    except Exception:
        return False


@pytest.mark.parametrize("pattern", ["adapter_model.safetensors", "training_args.bin", ".dpo_config.json.*"])
def test_a_final_save_on_a_full_disk_leaves_no_adapter_that_loads(failed_run, tmp_path, monkeypatch, pattern):
    trained, target = failed_run.trainer, tmp_path / "final"
    trained.save_model(str(target))  # a complete earlier save: the new one overwrites it in place
    assert adapter_loads(target)
    untouched = target / "notes.txt"
    untouched.write_text("the user's")
    disk = FullDisk(monkeypatch, tmp_path, pattern)
    with pytest.raises(DiskFullError) as error:
        trained.save_model(str(target))
    assert len(disk.failed) == 1 and Path(disk.failed[0]).parent == target
    message = str(error.value)
    last = resolve_resume("last", failed_run.out)
    assert message.startswith(
        f"{target}: {FULL}: the final save did not finish. The newest complete checkpoint, {last}, is intact: free "
        "space and run again with `--resume_from_checkpoint last` to save from there. Files of this save removed: "
    )
    assert not (target / "adapter_model.safetensors").exists() and not adapter_loads(target)
    assert untouched.read_text() == "the user's"  # what the save did not write stays
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temp file either


def test_a_full_disk_at_the_model_card_keeps_the_complete_adapter(failed_run, monkeypatch, capsys):
    trained, out = failed_run.trainer, failed_run.out
    # The first README.md is peft's, written with the adapter; the second is TRL's model card, then ours.
    disk = FullDisk(monkeypatch, out, "README.md", nth=2)
    assert exit_status_of(trained.save_model) == 2
    assert disk.failed == [str(out / "README.md")]
    assert one_error_line(capsys) == (
        f"error: {out / 'README.md'}: {FULL}: the model card was not written (no half-written card is left); the "
        "adapter saved beside it is complete. Free space and save again to get the card."
    )
    assert not (out / "README.md").exists()
    assert adapter_loads(out)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as saved:
        weights = {name: saved.get_tensor(name) for name in saved.keys()}
    trainable = {n: p for n, p in trained.model.named_parameters() if p.requires_grad}
    assert len(weights) == len(trainable) > 0
    assert json.loads((out / "dpo_config.json").read_text())["dpo_config"]["max_steps"] == 2


def test_a_full_disk_at_the_reference_cache_leaves_no_file_a_run_would_read(tmp_path, monkeypatch, capsys):
    key = {"num_rows": 2, "x": 1}
    chosen = AnswerLogps.from_lists([[-1.5] * 300, [-3.0] * 200])
    rejected = AnswerLogps.from_lists([[-2.0] * 100, [-0.5] * 400])
    kept, fresh = tmp_path / "ref_logps-kept.safetensors", tmp_path / "ref_logps-fresh.safetensors"
    save_reference_cache(kept, key, chosen, rejected)
    disk = FullDisk(monkeypatch, tmp_path, ".ref_logps-*", nth=1)  # the temp file it is written through
    with pytest.raises(DiskFullError) as error:
        save_reference_cache(kept, {**key, "x": 2}, chosen, rejected)
    not_written = (
        "the reference cache was not written (no partial file is left). Free space there, or set ref_cache_dir to a "
        "directory on another disk."
    )
    assert str(error.value) == f"{kept}: {FULL}: {not_written}"
    assert len(disk.failed) == 1 and load_reference_cache(kept, key) == (chosen, rejected)  # the old one, whole
    assert exit_status_of(save_reference_cache, fresh, key, chosen, rejected) == 2
    assert one_error_line(capsys) == f"error: {fresh}: {FULL}: {not_written}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]  # no temp file, nothing at `fresh`
    disk.free()
    assert load_reference_cache(fresh, key) is None  # a miss: the next run computes it
    # A truncated file (what a writer that is not atomic would leave) is never read as valid either.
    fresh.write_bytes(kept.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="refused"):
        assert load_reference_cache(fresh, key) is None


REWARD_MODULE = """
def length(prompts, completions):
    return [float(len(c)) for c in completions]
"""


def test_a_full_disk_at_the_pairs_file_keeps_the_old_one(tiny_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    output = tmp_path / "pairs.jsonl"
    output.write_text('{"prompt": "old"}\n')
    argv = [
        "pairs", "--prompts", str(tmp_path / "prompts.txt"), "--reward_fn", f"{tmp_path / 'rewards.py'}:length",
        "--model_name_or_path", tiny_dir, "--k", "4", "--max_new_tokens", "6", "--output", str(output),
    ]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("Is the Acme kettle good? Answer:\nSay hi. Answer:\n")
    disk = FullDisk(monkeypatch, tmp_path, ".pairs.jsonl.*", keep=20)
    assert cli.main(argv) == 2
    assert len(disk.failed) == 1
    assert one_error_line(capsys) == f"error: {output}: {FULL}: {NOT_WRITTEN}"
    assert output.read_text() == '{"prompt": "old"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "prompts.txt", "rewards.py"]


REAL_FULL_DISK = """
import errno, json, os, sys
import safetensors.torch, torch
from trl_dpo_ext.atomic import atomic_write, is_disk_full
from trl_dpo_ext.errors import DiskFullError

root, seen = sys.argv[1], {}
big = {"w": torch.arange(200_000, dtype=torch.float32)}


def write_atomically(path):
    with atomic_write(path) as handle:
        handle.write("x" * 400_000)


writers = {
    "torch": lambda path: torch.save(big, path),
    "safetensors": lambda path: safetensors.torch.save_file(big, path),
    "open": lambda path: open(path, "w").write("x" * 400_000),
    "atomic_write": write_atomically,
}
for name, write in writers.items():
    for leftover in os.listdir(root):
        os.unlink(os.path.join(root, leftover))
    with open(os.path.join(root, "filler"), "wb", buffering=0) as filler:  # fill the disk, then leave 16 KiB
        try:
            while True:
                filler.write(b"f" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    os.truncate(os.path.join(root, "filler"), os.path.getsize(os.path.join(root, "filler")) - 16384)
    path = os.path.join(root, name + ".out")
    try:
        write(path)
    except Exception as error:
        size = os.path.getsize(path) if os.path.exists(path) else None
        seen[name] = [type(error).__name__, str(error), is_disk_full(error, path), size]
print(json.dumps(seen))
"""


def test_injected_errors_are_those_of_a_full_disk(tmp_path):
    """A real full filesystem: a 1 MiB tmpfs, mounted in a user and mount namespace (no root needed where the kernel
    allows unprivileged user namespaces; skipped where it does not)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(REAL_FULL_DISK)
    shell = f"mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} {script} {mount}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    try:
        result = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no unshare")
    if result.returncode != 0 and ("mount" in result.stderr or "unshare" in result.stderr):
        pytest.skip(f"no unprivileged tmpfs here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    kind, message, full, size = seen["torch"]
    assert kind == "RuntimeError" and "unexpected pos" in message and full and 0 < size < 800_000
    assert TORCH_ERROR.split("{}")[0] in message  # the form FullDisk raises
    kind, message, full, size = seen["safetensors"]
    assert (kind, message, full, size) == ("SafetensorError", SAFETENSORS_ERROR, True, None)
    kind, message, full, size = seen["open"]
    assert (kind, message, full) == ("OSError", f"[Errno 28] {ENOSPC}", True)
    kind, message, full, size = seen["atomic_write"]
    assert kind == "DiskFullError" and message.startswith(f"{mount / 'atomic_write.out'}: {FULL}") and size is None
