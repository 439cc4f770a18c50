"""`make test-chaos`: each fault against the real CLI (`python -m sinkrec`, subprocesses) on ML-100K.

Faults are injected from outside (signals, a held lock, a dead port, a file-size limit) or, for the
per-rank faults, by a test-only callback (tests/train/faults_testkit.py) that makes one rank hang or
die at a chosen step. Every case adds a row to the table printed at the end (tests/chaos/conftest.py).
No assertion is about time; a hang guard only stops a broken build from hanging the suite.
"""

from __future__ import annotations

import json
import pickle
import resource
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from pipeline.manifest import files_intact, read
from tests.train import faults_testkit as kit
from tests.train.test_distributed import free_port
from tests.train.test_faults import Evil

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not (kit.ML100K / "manifest.json").is_file(),
                                                    reason="needs data/processed/ml-100k (make preprocess DATASET=ml-100k)")]

MARK = "--trainer.callbacks+=tests.train.faults_testkit.StepMarker"
# smoke.yaml's SinkRec (dropout 0.1, RVQ memory): the checkpoint carries the random state, so a resumed
# run must equal an uninterrupted one bit for bit
EXACT = ["--trainer.max_epochs", "2"]


def step_of(path: Path) -> tuple[int, int]:
    ck = torch.load(path, weights_only=True)
    return ck["global_step"], ck["epoch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (2 epochs, then test) the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("reference")
    p = kit.cli(kit.smoke_args(out, *EXACT))
    assert p.returncode == 0, p.stdout[-4000:]
    return out


def same_test_metrics(a: Path, b: Path) -> bool:
    ma, mb = (json.loads((d / "metrics_test.json").read_text())["metrics"] for d in (a, b))
    return len(ma) > 10 and ma == mb


def test_preemption_sigterm_then_resume(reference, tmp_path, record):
    out = tmp_path / "run"
    proc = kit.start([sys.executable, "-m", "sinkrec", *kit.smoke_args(out, *EXACT, MARK)])
    so_far = kit.wait_for_line(proc, "[step] 3 ")
    proc.send_signal(signal.SIGTERM)
    log = kit.finish(proc, so_far)
    step, _ = step_of(out / "ckpt" / "last.ckpt")
    statuses = kit.mlflow_statuses(out / "mlflow.db")
    ok = record("SIGTERM after step 3", "exit 143, last.ckpt at the step it stopped, MLflow run KILLED",
                f"exit {proc.returncode}, last.ckpt step {step}, MLflow {statuses}; "
                f"{next((line for line in log.splitlines() if line.startswith('preempted')), '(no message)')}",
                proc.returncode == 143 and step >= 3 and statuses == ["KILLED"])
    assert ok, log[-4000:]

    p = kit.cli(kit.smoke_args(out, *EXACT, "--ckpt_path", "last"))
    final, ref = step_of(out / "ckpt" / "last.ckpt"), step_of(reference / "ckpt" / "last.ckpt")
    statuses = sorted(kit.mlflow_statuses(out / "mlflow.db"))
    same = p.returncode == 0 and same_test_metrics(reference, out)
    ok = record("resume after SIGTERM (--ckpt_path last)",
                "exit 0; final step and test metrics bit-identical to the uninterrupted run's; MLflow FINISHED",
                f"exit {p.returncode}, final (step, epoch) {final} vs uninterrupted {ref}, all test metrics equal: "
                f"{same}, MLflow {statuses}",
                p.returncode == 0 and final == ref and same and statuses == ["FINISHED", "KILLED"])
    assert ok, p.stdout[-4000:]


def test_kill9_then_resume_equals_the_uninterrupted_run(reference, tmp_path, record):
    out = tmp_path / "run"
    proc = kit.start([sys.executable, "-m", "sinkrec", *kit.smoke_args(out, *EXACT, MARK)])
    epoch_end = step_of(reference / "ckpt" / "last.ckpt")[0] // 2  # two epochs of equal length
    so_far = kit.wait_for_line(proc, f"[step] {epoch_end + 2} ")  # inside epoch 1, after epoch 0's last.ckpt
    proc.kill()
    kit.finish(proc, so_far)
    killed_at = step_of(out / "ckpt" / "last.ckpt")
    p = kit.cli(kit.smoke_args(out, *EXACT, "--ckpt_path", "last"))
    a = json.loads((reference / "metrics_test.json").read_text())["metrics"]
    b = json.loads((out / "metrics_test.json").read_text())["metrics"] if p.returncode == 0 else {}
    same = p.returncode == 0 and same_test_metrics(reference, out)
    ok = record("kill -9 in epoch 1, then --ckpt_path last",
                "last.ckpt loads (epoch 0's); resumed test metrics bit-identical to the uninterrupted run's",
                f"last.ckpt after the kill: (step, epoch) {killed_at}; resume exit {p.returncode}; "
                f"test/ndcg_10 {b.get('test/ndcg_10')} vs {a['test/ndcg_10']}; all {len(a)} test metrics equal: {same}",
                killed_at == (epoch_end, 0) and p.returncode == 0 and same)
    assert ok, p.stdout[-4000:]


def torchrun(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "sinkrec", *kit.smoke_args(out, "--trainer.devices", "2", *extra)]


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_one_rank_hangs_or_dies(tmp_path, record, fault):
    proc = kit.start(torchrun(tmp_path, "--dist_timeout_s", "20", "--mlflow.enabled", "false",
                              "--trainer.callbacks+=tests.train.faults_testkit.RankFault",
                              f"--trainer.callbacks.signal_name={fault}"))
    log = kit.finish(proc)
    named = next((line for line in log.splitlines() if "rank(s) 1 stopped" in line), "")
    what = "hangs (SIGSTOP)" if fault == "SIGSTOP" else "dies (SIGKILL)"
    ok = record(f"rank 1 of 2 {what} at step 3", "the job ends non-zero within dist_timeout_s=20 (+ torchrun's "
                "shutdown), naming rank 1", f"exit {proc.returncode}; {named[named.find('error:'):] or '(rank not named)'}",
                proc.returncode != 0 and bool(named))
    assert ok, log[-5000:]


def test_preemption_of_a_two_rank_job(tmp_path, record):
    proc = kit.start(torchrun(tmp_path, MARK, "--test_after_fit", "false"))
    so_far = kit.wait_for_line(proc, "[step] 3 ")
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    log = kit.finish(proc, so_far)
    step, _ = step_of(tmp_path / "ckpt" / "last.ckpt")
    statuses = kit.mlflow_statuses(tmp_path / "mlflow.db")
    ok = record("SIGTERM to torchrun (2 ranks) after step 3",
                "both ranks stop at the same step, last.ckpt written, MLflow KILLED, exit non-zero",
                f"exit {proc.returncode}; {log.count('preempted: SIGTERM')} ranks reported "
                f"'preempted'; last.ckpt step {step}; MLflow {statuses}",
                proc.returncode != 0 and log.count("preempted: SIGTERM") == 2 and step >= 3 and statuses == ["KILLED"])
    assert ok, log[-5000:]


def test_mlflow_store_unreachable(tmp_path, record):
    p = kit.cli(kit.smoke_args(tmp_path, "--mlflow.tracking_uri", "http://127.0.0.1:9"))
    msg = next((line for line in p.stdout.splitlines() if line.startswith("error:")), "")
    ok = record("MLflow tracking URI on a dead port", "exit 2 before training, message names the URI",
                f"exit {p.returncode}; {msg}; trained: {(tmp_path / 'ckpt').exists()}",
                p.returncode == 2 and "http://127.0.0.1:9" in msg and not (tmp_path / "ckpt").exists())
    assert ok, p.stdout[-3000:]


def test_mlflow_store_locked(tmp_path, record):
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        p = kit.cli(kit.smoke_args(tmp_path, "--mlflow.check_timeout_s", "2"))
    finally:
        holder.rollback()
        holder.close()
    msg = next((line for line in p.stdout.splitlines() if line.startswith("error:")), "")
    ok = record("MLflow sqlite store locked by another process", "exit 2 before training, message names the URI",
                f"exit {p.returncode}; {msg}", p.returncode == 2 and f"sqlite:///{db}" in msg and "locked" in msg)
    assert ok, p.stdout[-3000:]


def test_disk_full_while_checkpointing(tmp_path, record):
    args = kit.smoke_args(tmp_path, "--mlflow.enabled", "false", "--test_after_fit", "false")
    first = kit.cli([*args, "--trainer.max_epochs", "1"])
    assert first.returncode == 0, first.stdout[-3000:]
    size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size

    def small_disk():  # writes past half a checkpoint fail (EFBIG), as on a full disk or quota
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    p = kit.cli([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"], preexec_fn=small_disk)
    msg = next((line for line in p.stdout.splitlines() if line.startswith("error:")), "")
    kept = step_of(tmp_path / "ckpt" / "last.ckpt")
    left = sorted(f.name for f in (tmp_path / "ckpt").iterdir() if f.name.startswith("."))
    ok = record("disk full while checkpointing (file-size limit)",
                "exit 2 naming the file; the previous last.ckpt loads; no temp file left",
                f"exit {p.returncode}; {msg[:160]}; last.ckpt (step, epoch) {kept}; temp files {left}",
                p.returncode == 2 and "disk is full" in msg and kept[1] == 0 and not left)
    assert ok, p.stdout[-3000:]


def test_two_preprocess_runs_on_the_same_output(tmp_path, record):
    cfg = kit.ROOT / "conf" / "pipeline" / "ml-100k.yaml"
    out = tmp_path / "ml-100k"
    cmd = [sys.executable, "-m", "pipeline", "--config", str(cfg), "--out", str(out)]
    first = kit.start(cmd)
    so_far = kit.wait_for_line(first, "[pipeline]")  # the lock is taken before the first line
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-build (ML-100K builds in about a second)
    try:
        second = kit.cli(["--config", str(cfg), "--out", str(out)], module="pipeline")
    finally:
        first.send_signal(signal.SIGCONT)
    log = kit.finish(first, so_far)
    manifest = read(out)
    intact = bool(manifest) and files_intact(manifest, out)
    msg = next((line for line in second.stdout.splitlines() if line.startswith("error:")), "")
    ok = record("two `python -m pipeline` on the same output at once",
                "the first exits 0 with a complete output, the second refuses (exit 2)",
                f"first exit {first.returncode}, output intact: {intact}; second exit {second.returncode}: {msg[:140]}",
                first.returncode == 0 and intact and second.returncode == 2 and "another pipeline run" in msg)
    assert ok, log[-2000:] + second.stdout[-2000:]


# ---------------------------------------------------------------- bad inputs, through the real CLI
@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    p = kit.cli(kit.smoke_args(out, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                               "--mlflow.enabled", "false", "--test_after_fit", "false"))
    assert p.returncode == 0, p.stdout[-3000:]
    return out


def bad_input_cases(ckpt_dir: Path, tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(case, extra args, what the one-paragraph error must name)."""
    evil = tmp / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil(tmp / "executed")}))
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 4096)
    last = str(ckpt_dir / "ckpt" / "last.ckpt")
    return [
        ("d_model not divisible by n_heads", ["--model.config.d_model", "30", "--model.config.n_heads", "4"],
         ["model.config.d_model=30", "n_heads=4"]),
        ("non-positive size", ["--model.config.n_codes", "0"], ["model.config.n_codes=0", "positive"]),
        ("non-positive batch size", ["--data.batch_size", "0"], ["data.batch_size=0", "positive"]),
        ("unknown key", ["--model.config.dmodel", "64"], ["--model.config.dmodel", "Did you mean --model.config.d_model"]),
        ("unknown arch", ["--model.config.arch", "bert"], ["arch='bert'", "must be one of"]),
        ("file that is not a checkpoint", ["--ckpt_path", str(garbage)], [str(garbage), "not a readable checkpoint"]),
        ("pickle that runs code", ["--ckpt_path", str(evil)], [str(evil), "weights_only=True"]),
        ("checkpoint of another model shape", ["--ckpt_path", last, "--model.config.d_model", "64"],
         ["model.config.d_model: checkpoint 32, this run 64", "d_model=32"]),
        ("resume with a conflicting override", ["--ckpt_path", "last", "--model.config.n_loops", "3"],
         ["model.config.n_loops: checkpoint 2, this run 3"]),
        ("missing data directory", ["--data.root", str(tmp / "nowhere")], [str(tmp / "nowhere")]),
    ]


def test_bad_inputs_get_one_paragraph(a_checkpoint, tmp_path, record):
    failed = []
    for case, extra, needles in bad_input_cases(a_checkpoint, tmp_path):
        p = kit.cli(kit.smoke_args(a_checkpoint, "--mlflow.enabled", "false", "--test_after_fit", "false",
                                   "--trainer.max_epochs", "2", *extra))
        msg = p.stdout[p.stdout.find("error:"):].strip() if "error:" in p.stdout else "(no error line)"
        ok = (p.returncode == 2 and "Traceback" not in p.stdout and all(n in msg for n in needles)
              and not (tmp_path / "executed").exists())
        record(f"bad input: {case}", "exit 2, one paragraph naming " + " / ".join(needles[:1]) + ", no traceback",
               f"exit {p.returncode}; {msg.splitlines()[0][:200]}", ok)
        if not ok:
            failed.append((case, p.stdout[-2000:]))
    assert step_of(a_checkpoint / "ckpt" / "last.ckpt")[1] == 0  # nothing was resumed by any of them
    assert not failed, failed


def test_reference_run_is_clean(reference):
    """Sanity: the uninterrupted run finished (FINISHED in MLflow, no temp files)."""
    assert kit.mlflow_statuses(reference / "mlflow.db") == ["FINISHED"]
    assert not [f for f in (reference / "ckpt").iterdir() if f.name.startswith(".")]
