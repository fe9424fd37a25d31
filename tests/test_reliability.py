"""Fault injection for what users must be able to rely on (issue 24; ``docs/reliability.md``):
checkpoints refuse altered bytes and unsafe configs before building anything, exports onto a
full disk say where, meta-training never hangs on non-finite truncations, keeps its best
score across a kill, writes its Lightning checkpoints atomically, refuses a second run in its
directory, and no native code is built or loaded.

References: the exact bytes changed (a flipped byte, a member rewritten with a valid CRC), the
exact errno (ENOSPC), a second process holding the lock, a task family whose loss is NaN.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import learnopt
from learnopt import checkpoint as ckpt
from learnopt.checkpoint import CheckpointError, weights_digest
from learnopt.learned import CoordinatewiseLSTM

ROOT = Path(__file__).resolve().parent.parent
KW = dict(hidden_size=4, num_layers=2, preprocess="log_sign", preprocess_p=5.0, output_scale=0.05)


def _export(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return learnopt.export_checkpoint(CoordinatewiseLSTM(**KW), path, {"meta_steps": 1})


def _rewrite(path: Path, mutate) -> Path:
    """Save ``mutate(payload)`` back to ``path`` as a well-formed file (valid CRCs) whose
    recorded digest is recomputed, so only the check under test can refuse it."""
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    payload["digest"] = weights_digest(payload["state_dict"])
    torch.save(payload, path)
    return path


def _member_offset(path: Path, suffix: str) -> tuple[int, int]:
    """Byte offset and size of the data of the first zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        learnopt.load(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment.lower() in msg.lower(), (fragment, msg)
    return msg


# --------------------------------------------------------------------------- checkpoints


def test_a_weight_with_altered_bytes_is_refused(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    start, size = _member_offset(path, "data/1")
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x01  # one bit of one weight: still a finite float
    path.write_bytes(bytes(raw))
    _refused(path, "corrupt", "crc")


def test_a_weight_rewritten_with_a_valid_crc_fails_the_digest(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    altered = tmp_path / "altered.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(altered, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/1"):
                data = bytes([data[0] ^ 0x01]) + data[1:]
            dst.writestr(info, data)
    _refused(altered, "digest")


def test_a_corrupt_pickle_member_is_called_corrupt(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    start, size = _member_offset(path, "data.pkl")
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    msg = _refused(path, "corrupt")
    assert "objects other than tensors" not in msg


@pytest.mark.parametrize("key,value", [
    ("hidden_size", 10**7), ("hidden_size", 2**19), ("num_layers", 0), ("hidden_size", 2.5),
    ("output_scale", float("nan")), ("output_scale", float("inf")),
    ("preprocess_p", float("nan")), ("preprocess_p", float("-inf")), ("preprocess_p", 0.0),
])
def test_a_bad_config_is_refused_naming_the_key_before_anything_is_allocated(tmp_path, monkeypatch, key, value):
    path = _rewrite(_export(tmp_path / "lopt.pt"), lambda p: p["config"].update({key: value}))
    devices = []
    real_init = CoordinatewiseLSTM.__init__

    def recording_init(self, *args, **kwargs):
        devices.append(torch.get_default_device().type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CoordinatewiseLSTM, "__init__", recording_init)
    _refused(path, key)
    assert set(devices) <= {"meta"}, f"built on {devices} before the config was refused"


def test_export_onto_a_full_disk_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = _export(tmp_path / "lopt.pt", seed=1)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        _export(path, seed=2)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lopt.pt"]


def test_files_written_before_the_digest_still_load(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    payload = torch.load(path, weights_only=True)
    del payload["digest"]
    torch.save(payload, path)
    assert learnopt.load(path).config() == KW


# --------------------------------------------------------------------------- meta-training

TINY = [
    "--model.estimator.num_tasks", "4", "--model.estimator.horizon", "6", "--model.estimator.unroll_length", "3",
    "--model.val_tasks", "4",
    "--model.learned_optimizer.init_args.hidden_size", "4", "--model.task_family.init_args.dim", "3",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
    # a regression must fail the test, not hang the suite
    "--trainer.max_time", "00:00:01:00",
]

# Helpers that configs name by import path: a task family whose loss is never finite, and a
# callback that SIGKILLs its own process right after a given validation (after the export).
HELPERS = '''
import os, signal
import lightning.pytorch as pl
from tasks.quadratic import QuadraticFamily


class NaNQuadratic(QuadraticFamily):
    def __init__(self, dim: int = 3) -> None:
        super().__init__(dim)
        self.init_scale = float("nan")  # every inner run starts at NaN parameters


class Ballast(pl.Callback):
    """Makes the checkpoints it is part of 256 KiB larger (a run whose state grew)."""

    def state_dict(self):
        return {"ballast": "x" * 2**18}


class UnannotatedFamily:
    """A task family that wraps the quadratic one without type annotations on ``sample``."""

    def __init__(self, dim: int = 3) -> None:
        self.inner = QuadraticFamily(dim)

    def sample(self, num_instances, generator=None):
        return self.inner.sample(num_instances, generator)


class KillAfterValidation(pl.Callback):
    def __init__(self, step: int = -1) -> None:
        self.step = step

    def on_validation_end(self, trainer, module) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """An empty working directory with the helper module importable (here and in subprocesses)."""
    (tmp_path / "reliability_helpers.py").write_text(HELPERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def _callbacks(export: str = "lopt.pt", kill_at: int | None = None, every: int = 2) -> list[str]:
    callbacks = [{"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", "init_args": {"path": export}}]
    if kill_at is not None:
        callbacks.append({"class_path": "reliability_helpers.KillAfterValidation", "init_args": {"step": kill_at}})
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": "ckpts", "every_n_train_steps": every, "save_last": True}})
    return ["--trainer.callbacks", json.dumps(callbacks)]


def _meta_train(capsys, *args: str) -> tuple[int, str]:
    from learnopt.cli import main

    rc = main(["meta-train", *TINY, *args])
    return rc, capsys.readouterr().err


def _subprocess_meta_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from learnopt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-c", code, "meta-train", *TINY, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


NAN_FAMILY = ["--model.task_family", "reliability_helpers.NaNQuadratic"]


def test_non_finite_truncations_stop_with_an_error_and_export_nothing(run_dir, capsys):
    rc, err = _meta_train(capsys, *NAN_FAMILY, "--model.max_nonfinite", "3", "--trainer.max_steps", "100000",
                          *_callbacks())
    assert rc == 1
    assert "3 consecutive truncations had a non-finite meta-gradient" in err, err
    assert not (run_dir / "lopt.pt").exists()


def test_skipped_truncations_count_as_steps_and_an_untrained_optimizer_is_not_exported(run_dir, capsys):
    from learnopt.train.callbacks import NoExport
    from learnopt.train.cli import meta_train

    with pytest.raises(NoExport, match="no meta-update was applied"):
        meta_train(TINY + NAN_FAMILY + ["--trainer.max_steps", "6",
                                        "--trainer.val_check_interval", "3"] + _callbacks())
    assert not (run_dir / "lopt.pt").exists()
    last = torch.load(run_dir / "ckpts" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert last["learnopt_counts"] == {"meta_updates": 0, "skipped_truncations": 6, "nonfinite_streak": 6}


@pytest.mark.parametrize("key", ["estimator.num_tasks", "val_tasks"])
def test_zero_tasks_are_refused(run_dir, capsys, key):
    rc, err = _meta_train(capsys, f"--model.{key}", "0", "--trainer.max_steps", "2", *_callbacks())
    assert rc == 1 and f"{key.split('.')[-1]} must be an integer >= 1, got 0" in err, err
    assert not (run_dir / "lopt.pt").exists()


def test_a_logger_save_dir_that_cannot_be_made_is_named_without_the_union_listing(run_dir, capsys):
    (run_dir / "a_file").write_text("")
    rc, err = _meta_train(capsys, "--trainer.logger", json.dumps(
        {"class_path": "learnopt.train.wandb_logging.WandbLogger", "init_args": {"save_dir": "a_file/runs"}}))
    assert rc == 1 and "WandbLogger could not be built: [Errno 20] Not a directory" in err, err
    assert "Expected a" not in err and "Union" not in err


def test_a_task_family_refused_for_its_annotations_is_told_which_method_differs(run_dir, capsys):
    rc, err = _meta_train(capsys, "--model.task_family", "reliability_helpers.UnannotatedFamily")
    assert rc == 1, err
    assert "model.task_family: reliability_helpers.UnannotatedFamily is not accepted as a task family" in err
    assert "its sample(self, num_instances, generator=None) must read sample(self, num_instances: 'int'" in err


def test_a_resume_after_a_kill_between_export_and_checkpoint_keeps_the_best_export(run_dir, capsys):
    from learnopt.checkpoint import update_metadata

    # Killed right after the first validation's export; the step-2 Lightning checkpoint predates it.
    done = _subprocess_meta_train("--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
                                  *_callbacks(kill_at=2))
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (run_dir / "ckpts" / "last.ckpt").exists() and (run_dir / "lopt.pt").exists()
    # The export holds a score no later validation can beat: a resume must never replace it.
    update_metadata("lopt.pt", validation={"val/log10_final_loss": -1e9, "meta_step": 2})
    before = learnopt.load("lopt.pt").state_dict()
    rc, err = _meta_train(capsys, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
                          "--ckpt_path", "ckpts/last.ckpt", *_callbacks())
    assert rc == 0, err
    after = learnopt.load("lopt.pt")
    assert after.checkpoint_metadata["validation"]["val/log10_final_loss"] == -1e9
    for k, v in before.items():
        assert torch.equal(after.state_dict()[k], v), k


@pytest.fixture
def lightning_checkpoint(run_dir, capsys) -> Path:
    rc, err = _meta_train(capsys, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *_callbacks())
    assert rc == 0, err
    return run_dir / "ckpts" / "last.ckpt"


@pytest.mark.parametrize("bad", ["truncated", "garbage", "export", "missing"])
def test_resuming_from_a_bad_ckpt_path_names_the_file(lightning_checkpoint, run_dir, capsys, bad):
    path = run_dir / f"{bad}.ckpt"
    if bad == "truncated":
        data = lightning_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif bad == "garbage":
        path.write_bytes(os.urandom(5000))
    elif bad == "export":
        path.write_bytes((run_dir / "lopt.pt").read_bytes())
    rc, err = _meta_train(capsys, "--trainer.max_steps", "4", "--ckpt_path", str(path), *_callbacks())
    assert rc == 1 and str(path) in err, err
    expected = {"truncated": "corrupt or truncated", "garbage": "corrupt or truncated",
                "export": "exported learned optimizer", "missing": "no such file"}[bad]
    assert expected in err, err


def test_a_second_run_in_the_same_directory_is_refused_until_the_first_dies(run_dir, capsys):
    # Another run's process, as the lock module takes it: flock on the lock file, its PID inside.
    (run_dir / "ckpts").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, time; fd = os.open('ckpts/.learnopt-meta-train.lock', "
         "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'pid {os.getpid()}'.encode()); "
         "print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = _meta_train(capsys, "--trainer.max_steps", "2", *_callbacks())
        assert rc == 1 and "in use by another meta-training run" in err and f"pid {holder.pid}" in err, err
        assert not (run_dir / "lopt.pt").exists() and not (run_dir / "runs/meta-train/config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder left its lock file behind: stale, it no longer stops a run.
    assert (run_dir / "ckpts" / ".learnopt-meta-train.lock").exists()
    rc, err = _meta_train(capsys, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *_callbacks())
    assert rc == 0, err
    assert (run_dir / "lopt.pt").exists()


def test_a_lightning_checkpoint_write_that_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    from learnopt.train.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.f.close()

    monkeypatch.setattr("learnopt.train.checkpoint_io.os.fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as info:
        io_.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


def _user_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


FULL_DISK_RUN = """
import errno, json, os, sys
import torch
from learnopt.cli import main

common = {tiny!r} + ["--trainer.callbacks", json.dumps([
    {{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
      "init_args": {{"dirpath": "ckpts", "every_n_train_steps": 2, "save_top_k": 0, "save_last": True}}}},
    {{"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", "init_args": {{"path": "lopt.pt"}}}}])]
assert main(["meta-train", *common, "--trainer.max_steps", "2"]) == 0
# the resumed run's checkpoints are larger than the one on disk, which alone cannot make room
common[-1] = common[-1][:-1] + ', {{"class_path": "reliability_helpers.Ballast"}}]'
try:  # fill the checkpoint filesystem
    with open("ckpts/filler", "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()
except OSError as e:
    assert e.errno == errno.ENOSPC
try:
    main(["meta-train", *common, "--trainer.max_steps", "4", "--ckpt_path", "ckpts/last.ckpt"])
    print("RESULT no error")
except OSError as e:
    print("RESULT error", e)
os.remove("ckpts/filler")
print("RESULT files", sorted(os.listdir("ckpts")))
print("RESULT step", torch.load("ckpts/last.ckpt", weights_only=False)["global_step"])
"""


@pytest.mark.skipif(not _user_namespaces(), reason="needs unshare --user --mount for a tiny tmpfs")
def test_a_full_disk_never_truncates_last_ckpt(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "reliability_helpers.py").write_text(HELPERS)
    (tmp_path / "run.py").write_text(FULL_DISK_RUN.format(tiny=TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=1m tmpfs ckpts && exec {sys.executable} run.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert done.returncode == 0, (results, done.stderr[-3000:])
    assert "No space left on device" in results[0] and "ckpts/last.ckpt" in results[0], results
    assert results[1] == "RESULT files ['.learnopt-meta-train.lock', 'last.ckpt']", results
    assert results[2] == "RESULT step 2", results


# --------------------------------------------------------------------------- no native code


def test_learnopt_ships_no_compiled_kernel_and_loads_no_shared_library():
    """The runtime-compiled C++ LSTM kernel is gone (it saved 7-9% of a step): nothing in the
    package compiles code or loads a library of its own, so there is no kernel cache to plant
    one in. The one library loaded is the system's C library (``runtime.keep_freed_memory``)."""
    sources = {p: p.read_text() for p in (ROOT / "learnopt").rglob("*.py")}
    # learnopt.meta.compiled only asks whether torch.compile's CPU backend has a C++ compiler on
    # the PATH (shutil.which); compiling and loading kernels is torch's own, opt-in, machinery.
    compiled = ROOT / "learnopt" / "meta" / "compiled.py"
    for needle in ("g++", "-shared", "cpp_extension", "load_inline", "LEARNOPT_CACHE"):
        assert not [p for p, text in sources.items() if needle in text and not (p == compiled and needle == "g++")], \
            needle
    assert "subprocess" not in sources[compiled] and "CDLL" not in sources[compiled]
    loaders = {p: text.count("CDLL(") for p, text in sources.items() if "CDLL(" in text}
    assert loaders == {ROOT / "learnopt" / "runtime.py": 1}
    assert 'CDLL(name)' in sources[ROOT / "learnopt" / "runtime.py"]
    assert 'name = ctypes.util.find_library("c")' in sources[ROOT / "learnopt" / "runtime.py"]

