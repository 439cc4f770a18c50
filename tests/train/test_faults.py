"""The trainer under bad inputs and faults, the quick cases (the slow ones against ML-100K: tests/chaos).

Bad inputs go through `sinkrec.cli.run` (what `python -m sinkrec` calls): exit 2 and one paragraph
naming the key or file, no traceback. Checkpoint writes are atomic and survive a kill or a full disk."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkrec.checkpoints import AtomicCheckpointIO, CheckpointWriteError, read_checkpoint
from sinkrec.cli import main, run
from sinkrec.errors import UserError
from tests.train.test_cli import write_config

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--mlflow.enabled", "false", "--test_after_fit", "false"]


def clean_error(capsys, argv: list[str], *needles: str) -> str:
    """run(argv) must exit 2 with a one-paragraph error holding every needle and no traceback."""
    assert run(argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("error: "):]
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(scope="module")
def ckpt_run(tiny_data, tmp_path_factory) -> Path:
    """One epoch of the tiny model; its config is <out>/c.yaml, its checkpoints <out>/ckpt/."""
    out = tmp_path_factory.mktemp("faults")
    cfg = write_config(out / "c.yaml", tiny_data, out, trainer={"max_epochs": 1})
    main(["fit", "--config", str(cfg), *FAST])
    return out


# ---------------------------------------------------------------- config values that cannot work
@pytest.mark.parametrize("override, needles", [
    (["--model.config.d_model", "30", "--model.config.n_heads", "4"],
     ["model.config.d_model=30", "divisible by model.config.n_heads=4", "the command line",
      "d_model=32 or n_heads=3"]),
    (["--model.config.n_blocks", "0"], ["model.config.n_blocks=0", "positive integer"]),
    (["--data.batch_size", "-3"], ["data.batch_size=-3", "positive integer"]),
    (["--optimizer.lr", "0"], ["optimizer.lr=0.0", "it must be > 0"]),
    (["--model.config.arch", "transformer"], ["arch='transformer'", "must be one of", "the command line"]),
    (["--model.config.n_headz", "2"],
     ["unrecognized arguments: --model.config.n_headz", "Did you mean --model.config.n_heads?"]),
])
def test_bad_config_values_are_one_paragraph(tiny_data, tmp_path, capsys, override, needles):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path)
    clean_error(capsys, ["fit", "--config", str(cfg), *FAST, *override], *needles)
    assert not (tmp_path / "ckpt").exists()  # refused before anything trained


def test_bad_value_in_the_config_file_names_the_file(tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path, d_model=18, n_heads=4)
    clean_error(capsys, ["fit", "--config", str(cfg), *FAST], "model.config.d_model=18", str(cfg))


def test_unknown_key_in_the_config_file_suggests_the_nearest(tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path, n_headz=2)
    clean_error(capsys, ["fit", "--config", str(cfg), *FAST], "'model.config.n_headz'", str(cfg),
                "Did you mean --model.config.n_heads?")


def test_debug_shows_the_traceback(tiny_data, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path)
    with pytest.raises(UserError, match="divisible"):
        run(["fit", "--config", str(cfg), *FAST, "--model.config.n_heads", "3", "--debug"])
    monkeypatch.setenv("SINKREC_DEBUG", "1")
    with pytest.raises(UserError, match="positive integer"):
        run(["fit", "--config", str(cfg), *FAST, "--model.config.d_model", "0"])


# ---------------------------------------------------------------- checkpoints as input
class Evil:
    """Unpickling this runs a command; a weights-only load must refuse it before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_file_that_is_not_a_checkpoint_is_refused_and_never_executed(ckpt_run, capsys, tmp_path):
    cfg = ckpt_run / "c.yaml"
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil(marker)}))
    msg = clean_error(capsys, ["test", "--config", str(cfg), "--ckpt_path", str(evil), "--mlflow.enabled", "false"],
                      str(evil), "not a readable checkpoint", "weights_only=True")
    assert not marker.exists()
    assert "weights_only=False" not in msg  # torch's advice to load it unsafely is not repeated
    for junk in (b"\x00not a checkpoint at all" * 10, b"\x00" * 4096):
        garbage = tmp_path / "garbage.ckpt"
        garbage.write_bytes(junk)
        msg = clean_error(capsys, ["test", "--config", str(cfg), "--ckpt_path", str(garbage), "--mlflow.enabled",
                                   "false"], str(garbage), "not a readable checkpoint")
        assert "weights_only=False" not in msg
    plain = tmp_path / "tensor.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    clean_error(capsys, ["test", "--config", str(cfg), "--ckpt_path", str(plain), "--mlflow.enabled", "false"],
                str(plain), "not a Lightning checkpoint")


def test_checkpoint_of_another_model_shape_names_keys_and_config(ckpt_run, capsys):
    cfg, last = ckpt_run / "c.yaml", str(ckpt_run / "ckpt" / "last.ckpt")
    msg = clean_error(capsys, ["test", "--config", str(cfg), "--ckpt_path", last, "--mlflow.enabled", "false",
                               "--model.config.d_model", "32"],
                      last, "model.config.d_model: checkpoint 16, this run 32", "d_model=16", "n_heads=2")
    assert "drop the overrides" in msg


def test_checkpoint_of_another_dataset_names_the_mismatching_keys(ckpt_run, tmp_path, capsys):
    from tests.train.conftest import make_processed

    other = make_processed(tmp_path / "other", num_items=50)
    cfg = write_config(tmp_path / "o.yaml", other, tmp_path)
    last = str(ckpt_run / "ckpt" / "last.ckpt")
    clean_error(capsys, ["test", "--config", str(cfg), "--ckpt_path", last, "--mlflow.enabled", "false"],
                last, "model.item_emb.weight: checkpoint (41, 16), this model (51, 16)", "num_items=40")


def test_resume_with_a_conflicting_override_is_refused(ckpt_run, capsys):
    cfg = ckpt_run / "c.yaml"
    for override, needle in ((["--model.config.n_loops", "2"], "model.config.n_loops: checkpoint 1, this run 2"),
                             (["--optimizer.lr", "0.5"], "optimizer.lr: checkpoint 0.01, this run 0.5"),
                             (["--data.max_len", "12"], "model.config.max_len is data.max_len")):
        clean_error(capsys, ["fit", "--config", str(cfg), *FAST, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                             *override], needle, "last.ckpt")
    assert torch.load(ckpt_run / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0  # nothing resumed


# ---------------------------------------------------------------- atomic checkpoint writes
def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)

    real_open = open

    class FullDisk:  # a file whose write stops half-way with ENOSPC, as on a full disk
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", FullDisk)
    with pytest.raises(CheckpointWriteError, match=rf"{path}: the disk is full .*previous last.ckpt is intact"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


KILL_MID_SAVE = """
import os, signal, sys, torch
from sinkrec.checkpoints import AtomicCheckpointIO
path = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 0}, path)
real_fsync = os.fsync
def killed_mid_save(fd):  # the new bytes are in the file, not yet renamed: kill -9 now
    os.kill(os.getpid(), signal.SIGKILL)
os.fsync = killed_mid_save
io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 1}, path)
"""


def test_kill_during_a_checkpoint_write_leaves_the_old_one_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    p = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = read_checkpoint(path)
    assert ck["epoch"] == 0 and torch.equal(ck["state_dict"]["w"], torch.ones(1000))


# ---------------------------------------------------------------- MLflow store unreachable or locked
def test_unreachable_mlflow_store_fails_before_training(tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path)
    clean_error(capsys, ["fit", "--config", str(cfg), "--mlflow.tracking_uri", "http://127.0.0.1:9"],
                "MLflow tracking store http://127.0.0.1:9 is unreachable", "--mlflow.enabled false")
    assert not (tmp_path / "ckpt").exists()


def test_locked_mlflow_store_fails_before_training(tiny_data, tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path)
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        clean_error(capsys, ["fit", "--config", str(cfg), "--mlflow.check_timeout_s", "0.5"],
                    f"MLflow tracking store sqlite:///{db} cannot be written", "locked")
    finally:
        holder.rollback()
        holder.close()
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------- training that ends early
def test_max_steps_before_the_first_validation_is_not_an_error(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path)
    assert run(["fit", "--config", str(cfg), *FAST, "--trainer.max_steps", "1"]) == 0
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_collective_timeout_is_set_and_configurable():
    import datetime

    from sinkrec.distributed import choose_strategy

    ddp, line = choose_strategy("auto", "conf/deepspeed/zero2.json", 2, datetime.timedelta(seconds=42))
    assert ddp._timeout == datetime.timedelta(seconds=42) and "timeout 42 s" in line
    ddp, _ = choose_strategy("ddp", "x", 2, datetime.timedelta(seconds=7))
    assert ddp._timeout == datetime.timedelta(seconds=7)


@pytest.mark.trains
def test_resume_with_dropout_and_memory_continues_exactly(tiny_data, tmp_path):
    """The random stream (dropout, RVQ) is part of the checkpoint: resuming from an epoch-end last.ckpt
    (what a kill -9 leaves) ends bit-identical to the uninterrupted run, dropout and memory on."""
    model = {"arch": "sinkrec", "dropout": 0.3}
    straight = write_config(tmp_path / "a.yaml", tiny_data, tmp_path / "a", **model)
    main(["fit", "--config", str(straight), *FAST])
    stop = {"callbacks": [{"class_path": "tests.train.test_cli.StopAfterEpoch", "init_args": {"epoch": 0}}]}
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", trainer=stop, **model)
    main(["fit", "--config", str(cut), *FAST])
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", **model)
    main(["fit", "--config", str(cut), *FAST, "--ckpt_path", "last"])
    a = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_sigterm_stops_at_a_step_writes_last_and_marks_the_run_killed(tiny_data, tmp_path, capsys):
    """In-process twin of the chaos case: SIGTERM at step 2 -> exit 143, last.ckpt of that step, KILLED."""
    import mlflow

    sigterm = {"callbacks": [{"class_path": "tests.train.faults_testkit.RankFault",
                              "init_args": {"rank": 0, "step": 2, "signal_name": "SIGTERM"}}]}
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path, trainer={**sigterm, "max_epochs": 3})
    before = signal.getsignal(signal.SIGTERM)
    assert run(["fit", "--config", str(cfg)]) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only while training
    assert "preempted: SIGTERM: stopped at step 3" in capsys.readouterr().err
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "KILLED"


@pytest.mark.trains
def test_resume_after_a_mid_epoch_sigterm_is_bit_identical(tiny_data, tmp_path):
    """SIGTERM inside epoch 0, then --ckpt_path last: the same weights as a run never interrupted
    (the random state is in the checkpoint, the training loader resumes at the next batch)."""
    model = {"arch": "sinkrec", "dropout": 0.3}
    straight = write_config(tmp_path / "a.yaml", tiny_data, tmp_path / "a", **model)
    main(["fit", "--config", str(straight), *FAST])
    sigterm = {"callbacks": [{"class_path": "tests.train.faults_testkit.RankFault",
                              "init_args": {"rank": 0, "step": 1, "signal_name": "SIGTERM"}}]}
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", trainer=sigterm, **model)
    assert run(["fit", "--config", str(cut), *FAST]) == 143
    assert torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2  # mid-epoch
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", **model)
    assert run(["fit", "--config", str(cut), *FAST, "--ckpt_path", "last"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


# ---------------------------------------------------------------- bad data, through the CLI
def _corrupt(root: Path) -> None:
    shard = root / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF  # inside the first data page: the footer still parses, the hash differs
    shard.write_bytes(bytes(data))


def _truncate(root: Path) -> None:
    shard = root / "shards" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])


def _edit_manifest(fn):
    def edit(root: Path) -> None:
        import json

        m = json.loads((root / "manifest.json").read_text())
        fn(m)
        (root / "manifest.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("damage, verify, needles", [
    (_corrupt, "own", ["part-00001.parquet", "sha256", "Re-run the pipeline"]),
    (_truncate, "off", ["part-00000.parquet", "truncated or corrupt"]),
    (_edit_manifest(lambda m: m["shards"][0].update(rows=999)), "off", ["part-00000.parquet", "manifest.json says 999"]),
    (_edit_manifest(lambda m: m.update(num_items=5)), "off", ["row group 0", "is outside 1..5"]),
    (_edit_manifest(lambda m: m["shards"][1].update(path="../../etc/hostname")), "off",
     ["points outside the dataset directory"]),
    (lambda root: (root / "manifest.json").unlink(), "own", ["no manifest", "make preprocess"]),
])
def test_bad_data_is_one_paragraph_naming_the_file(tmp_path, capsys, damage, verify, needles):
    from tests.train.conftest import make_processed

    root = make_processed(tmp_path / "d")
    damage(root)
    cfg = write_config(tmp_path / "c.yaml", root, tmp_path, trainer={"max_epochs": 1})
    clean_error(capsys, ["fit", "--config", str(cfg), "--data.verify", verify, *FAST], *needles)


def test_backends_may_differ_from_the_checkpoint_with_a_warning():
    """kernel_backend / gate_backend / conv_backend are implementation choices: a checkpoint made
    with another one is used (warned), any other model.config difference is refused."""
    from sinkrec.checkpoints import check_against
    from sinkrec.errors import UserError

    module = torch.nn.Linear(2, 2)
    made = {"d_model": 16, "kernel_backend": "chunk", "gate_backend": "reference", "conv_backend": "reference"}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": {"config": made}}
    module.hparams = {"config": {**made, "kernel_backend": "recurrent", "conv_backend": "channels_last"}}
    warnings = check_against(ckpt, "x.ckpt", module, resuming=True)
    assert len(warnings) == 2 and all("runtime choice" in w for w in warnings)
    assert any("conv_backend: checkpoint 'reference', this run 'channels_last'" in w for w in warnings)
    module.hparams["config"]["d_model"] = 32
    with pytest.raises(UserError, match="model.config.d_model: checkpoint 16, this run 32"):
        check_against(ckpt, "x.ckpt", module, resuming=True)


def _open_store_at_once(uri: str, barrier, results) -> None:
    from sinkrec.cli import ensure_experiment

    barrier.wait()  # all processes open the fresh store at the same moment
    try:
        ensure_experiment(uri, "ml-1m")
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports what each process hit
        results.put(f"{type(e).__name__}: {str(e)[:200]}")


def test_runs_started_together_share_a_fresh_mlflow_store(tmp_path):
    """Without the lock in ensure_experiment, three processes opening a new sqlite store at once died
    in MLflow's schema migration (duplicate column / table already exists) in 3 of 3 tries."""
    import multiprocessing as mp

    from mlflow.tracking import MlflowClient

    ctx = mp.get_context("spawn")  # not fork: the test process may already run Arrow / torch threads
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_store_at_once, args=(uri, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert outcomes == ["ok"] * 3, outcomes
    assert [e.name for e in MlflowClient(uri).search_experiments()].count("ml-1m") == 1
