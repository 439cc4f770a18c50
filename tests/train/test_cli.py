"""End to end through `python -m sinkrec` (in-process): fit -> test, MLflow store read back, resume,
checkpoints that load with weights_only=True, predictions, strategy choice, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from sinkrec.cli import main
from sinkrec.lit_module import SeqRecModule

TINY_MODEL = {"arch": "sinkrec", "d_model": 16, "n_heads": 2, "n_blocks": 1, "n_loops": 1, "n_codes": 16,
              "dropout": 0.1}


class StopAfterEpoch(Callback):
    """Simulates an interrupted job: stops cleanly after `epoch` (the schedule still spans max_epochs)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def write_config(path: Path, data: Path, out: Path, trainer: dict | None = None, **model) -> Path:
    cfg = {
        "seed_everything": 7,
        "model": {"config": {**TINY_MODEL, **model}, "evaluation": {"ks": [5, 10, 200], "predict_k": 7}},
        "data": {"root": str(data), "max_len": 20, "batch_size": 16, "eval_batch_size": 32},
        "optimizer": {"lr": 0.01, "warmup_steps": 2},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "default_root_dir": str(out), **(trainer or {})},
        "checkpoint": {"dirpath": str(out / "ckpt")},
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tiny_kind_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = write_config(out / "tiny.yaml", tiny_kind_data, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's own knob; default here 10 s
        main(["fit", "--config", str(cfg)])
    return out


@pytest.mark.trains
def test_fit_then_test_logged_to_mlflow(trained, tiny_kind_data):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-kind")  # one experiment per dataset (manifest name)
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    # the UI shows the model-training view and the processed dataset as the run's input
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.name == "tiny-kind" and data_input.dataset.source_type == "local"
    assert len(data_input.dataset.digest) == 16
    params = run.data.params
    assert params["model.config.num_items"] == "40"  # linked from the manifest, not from the YAML
    assert params["model.config.max_len"] == "20"  # linked from data.max_len
    assert params["model.optim.lr"] == "0.01" and params["data.root"] == str(tiny_kind_data)
    metrics = run.data.metrics
    for key in ("test/hr_10", "test/ndcg_10", "test/mrr", "test/hr_200", "test/habit/hr_10",
                "test/dynamic/ndcg_10", "val/ndcg_10", "train/loss_step", "train/events_per_s",
                "train/epoch_events_per_s", "val/sink/excess_occupancy", "lr-AdamW/pg1"):
        assert key in metrics, key
    assert len(client.get_metric_history(run.info.run_id, "val/ndcg_10")) == 2  # per epoch
    assert metrics["test/count"] == 60 and metrics["test/hr_200"] == 1.0  # k > catalogue: all hits
    assert metrics["test/habit/count"] + metrics["test/dynamic/count"] == 60
    # both ranking conventions from the same pass: removing history items can only lift the target
    assert metrics["test_seen_excluded/count"] == 60
    for k in ("hr_10", "ndcg_10", "mrr", "val_mrr"):
        stage, name = ("val", "mrr") if k == "val_mrr" else ("test", k)
        assert metrics[f"{stage}_seen_excluded/{name}"] >= metrics[f"{stage}/{name}"], k
    assert metrics["test_seen_excluded/mrr"] > metrics["test/mrr"]  # tiny data: history items do outrank targets

    def walk(path=None):
        for a in client.list_artifacts(run.info.run_id, path):
            yield from walk(a.path) if a.is_dir else [a.path]

    artifacts = set(walk())
    for name in ("config.yaml", "resolved_model.yaml", "data/manifest.json", "metrics_test.json",
                 "plots/sink_diagnostics.png"):
        assert name in artifacts, (name, artifacts)
    assert "plots/learning_curves.png" not in artifacts  # the UI draws the learning curves itself
    assert any(k.startswith("system/cpu_utilization") for k in metrics)  # MLflow system metrics
    assert any(k.startswith("system/system_memory_usage") for k in metrics)
    assert any(a.startswith("checkpoints/best-") for a in artifacts)
    local = Path(client.download_artifacts(run.info.run_id, "metrics_test.json", str(trained / "dl")))
    final = json.loads(local.read_text())
    assert final["run_id"] == run.info.run_id
    assert final["metrics"]["test/hr_10"] == pytest.approx(metrics["test/hr_10"], abs=1e-6)
    assert final["metrics"]["test_seen_excluded/mrr"] == pytest.approx(metrics["test_seen_excluded/mrr"], abs=1e-6)


@pytest.mark.trains
def test_the_logged_mlflow_model_loads_and_scores_a_batch(trained, tiny_kind_data):
    """`mlflow.pytorch.load_model` on the run gives the best checkpoint's model: its scores of a batch
    equal the ones the checkpoint itself gives, and the signature is the one logged."""
    import mlflow

    from sinkrec.data import SeqRecDataModule

    uri = f"sqlite:///{trained / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-kind").experiment_id])
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.source_run_id == run.info.run_id and logged.name == "model"
    scorer = mlflow.pytorch.load_model(logged.model_uri).eval()
    batch = next(iter(SeqRecDataModule(root=str(tiny_kind_data), max_len=20, eval_batch_size=8).loader("test", 0, 1)))
    inputs = torch.stack([batch["items"], batch["ts"]], dim=1).long()  # [B, 2, T]
    with torch.no_grad():
        scores = scorer(inputs)
        (best,) = (trained / "ckpt").glob("best-*.ckpt")
        model = SeqRecModule.load_from_checkpoint(best, map_location="cpu", weights_only=True).model.eval()
        expected = model(batch["items"], batch["ts"]).hidden[:, -1] @ model.item_embeddings().T
    assert scores.shape == (len(batch["items"]), 41)  # 40 items + padding
    torch.testing.assert_close(scores, expected)
    info = mlflow.models.get_model_info(logged.model_uri)
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 2, -1)
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 41)


def test_checkpoints_load_weights_only_and_carry_training_state(trained):
    ckpts = sorted((trained / "ckpt").glob("*.ckpt"))
    assert {"last.ckpt"} <= {c.name for c in ckpts} and any(c.name.startswith("best-") for c in ckpts)
    ck = torch.load(trained / "ckpt" / "last.ckpt", weights_only=True)
    assert ck["epoch"] == 1 and ck["optimizer_states"] and ck["lr_schedulers"]
    assert ck["hyper_parameters"]["config"]["num_items"] == 40
    best = next((trained / "ckpt").glob("best-*.ckpt"))
    module = SeqRecModule.load_from_checkpoint(best, weights_only=True)
    assert module.config.num_items == 40 and module.model.item_embeddings().shape == (41, 16)


@pytest.mark.trains
def test_resume_from_last_continues_exactly(tiny_data, tmp_path):
    # memory off and no dropout: no random draws during training, so the runs must agree bit for bit
    straight = write_config(tmp_path / "a.yaml", tiny_data, tmp_path / "a", arch="gdn", dropout=0.0)
    main(["fit", "--config", str(straight), "--trainer.max_epochs", "2", "--mlflow.enabled", "false",
          "--test_after_fit", "false"])
    stop = {"callbacks": [{"class_path": "tests.train.test_cli.StopAfterEpoch", "init_args": {"epoch": 0}}]}
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", trainer=stop, arch="gdn", dropout=0.0)
    main(["fit", "--config", str(cut), "--trainer.max_epochs", "2", "--mlflow.enabled", "false",
          "--test_after_fit", "false"])
    assert torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    cut = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b", arch="gdn", dropout=0.0)
    main(["fit", "--config", str(cut), "--trainer.max_epochs", "2", "--mlflow.enabled", "false",
          "--test_after_fit", "false", "--ckpt_path", "last"])
    a = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_predict_writes_top_k_for_every_user_once(trained, tiny_kind_data):
    cfg = trained / "tiny.yaml"
    best = next((trained / "ckpt").glob("best-*.ckpt"))
    main(["predict", "--config", str(cfg), "--ckpt_path", str(best), "--mlflow.enabled", "false"])
    table = pq.read_table(trained / "predictions" / "rank-000.parquet").to_pydict()
    assert sorted(table["user_idx"]) == list(range(60))
    assert all(len(items) == 7 and 0 not in items and len(set(items)) == 7 for items in table["items"])


def test_config_errors_name_the_key_or_file(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "c")
    with pytest.raises(Exception, match="manifest"):
        main(["fit", "--config", str(cfg), "--data.root", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="SinkRecConfig.arch"):
        main(["fit", "--config", str(cfg), "--model.config.arch", "transformer", "--mlflow.enabled", "false"])
    with pytest.raises(ValueError, match="trainer.strategy='deepspeed' needs CUDA"):
        main(["fit", "--config", str(cfg), "--trainer.strategy", "deepspeed", "--mlflow.enabled", "false"])


def test_auto_strategy(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from sinkrec.distributed import choose_strategy

    assert choose_strategy("auto", "conf/deepspeed/zero2.json", 1)[0] == "auto"
    ddp, line = choose_strategy("auto", "conf/deepspeed/zero2.json", 4)
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo" and "ddp (gloo" in line
    assert choose_strategy("ddp_spawn", "x", 2)[0] == "ddp_spawn"  # explicit choices pass through
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ds, line = choose_strategy("auto", "conf/deepspeed/zero2.json", 8)
    assert isinstance(ds, DeepSpeedStrategy) and "ZeRO stage 2" in line


@pytest.mark.trains
def test_study_analysis_recomputes_the_trainers_test_metrics(trained, tiny_kind_data):
    """sinkrec.study's per-user pass over the best checkpoint gives the trainer's own test numbers."""
    from sinkrec.study import analyse, summarise

    final = json.loads((trained / "metrics_test.json").read_text())
    a = analyse(final["best_checkpoint"], tiny_kind_data, max_len=20)
    s = summarise(a)
    assert len(a["rank"]) == 60 and sorted(a["user_idx"].tolist()) == list(range(60))
    for key in ("ndcg_10", "hr_10", "habit/ndcg_10", "dynamic/ndcg_10"):
        assert s[key] == pytest.approx(final["metrics"][f"test/{key}"], abs=1e-6), key
    assert {"excess_occupancy", "write_share", "rho_repeated", "rho_other"} <= set(a)
    assert ((a["recent_habit_share"] >= 0) & (a["recent_habit_share"] <= 1)).all()
    assert 0 < s["code_use_l0"] <= 1 and 0 < s["code_perplexity_l0"] <= s["code_use_l0"] + 1e-6


@pytest.mark.parametrize("name,expected", [
    ("ml1m_sinkrec", {"arch": "sinkrec", "d_model": 128, "n_heads": 2, "n_loops": 1, "n_codes": 128, "lr": 0.002,
                      "max_epochs": 30, "patience": 6}),
    ("ml1m_gdn", {"arch": "gdn", "n_heads": 2, "n_loops": 1, "lr": 0.002, "max_epochs": 30, "patience": 6}),
    ("ml1m_sasrec", {"arch": "sasrec", "d_model": 128, "n_heads": 1, "lr": 0.001, "max_epochs": 40, "patience": 10}),
    ("ml1m_elastic", {"arch": "elastic", "n_heads": 2, "n_mem_keys": 128, "lr": 0.002, "max_epochs": 30,
                      "patience": 6}),
])
def test_ml1m_configs_compose_the_base_and_their_own_lines(name, expected, capsys):
    """Each ml1m_<model>.yaml includes ml1m_base.yaml (`config:`) and overrides single keys: the base's
    other keys in the same groups survive (a nested mapping there would drop them)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", f"conf/train/{name}.yaml", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    m = cfg["model"]["config"]
    got = {**{k: m[k] for k in ("arch", "d_model", "n_heads", "n_loops", "n_codes", "n_mem_keys") if k in expected},
           "lr": cfg["optimizer"]["lr"], "max_epochs": cfg["trainer"]["max_epochs"],
           "patience": cfg["early_stopping"]["patience"]}
    assert got == expected
    assert (m["n_blocks"], m["dropout"], m["loss"]) == (2, 0.2, "full")  # from the base
    assert m["d_model"] == expected.get("d_model", 64)  # the base's 64 unless the model sets its own
    d = cfg["data"]
    assert (d["root"], d["max_len"], d["batch_size"], d["eval_batch_size"]) == ("data/processed/ml-1m", 200, 128, 512)
    assert cfg["trainer"]["max_time"] == "00:00:36:00" and cfg["trainer"]["precision"] == "32-true"
    assert cfg["trainer"]["default_root_dir"] == f"outputs/{name}"
    assert cfg["checkpoint"]["dirpath"] == f"checkpoints/{name}"
    # selected on the convention the published anchors rank with (history removed), from the base
    assert cfg["checkpoint"]["monitor"] == cfg["early_stopping"]["monitor"] == "val_seen_excluded/ndcg_10"
