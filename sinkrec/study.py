"""The SinkBench study: does SinkRec's memory cure the semantic state sink? (`make study`, docs/STUDY.md)

    python -m sinkrec.study [--quick] [--resume] [--work outputs/study] [--report docs/STUDY.md]

1. Data. One SinkBench log per repeat ratio (`pipeline.synth`, same users, items and seed; only the
   share of habit events changes), preprocessed by the normal pipeline into
   data/processed/sinkbench-r<ratio>.
2. Runs. Every (ratio, model, seed) of the grid, and at the highest ratio every SinkRec ablation,
   trains with `python -m sinkrec fit --config conf/train/sinkbench_study.yaml` under the same budget
   (epochs, window, width, depth), each run an MLflow child of one parent study run.
3. Analysis of each run's best checkpoint (chosen on validation) on the test split, per user:
   the target's rank and kind (habit / dynamic), the habit share of the user's most recent `WINDOW`
   events (ground truth from SinkBench's `kind` column), and, for the recurrent models, the sink
   diagnostics of `sinkrec.diagnostics` with the habit events as the repeated set: excess occupancy
   (rank-limited; 1 = no sink), write share, memory coverage rho on habit vs dynamic events. The
   overall NDCG@10 recomputed here must equal the trainer's own test metric (checked, 1e-6).
4. Report: tables (mean +- sample std over seeds), the metric-vs-ratio plot, the behavioural sink
   curve (NDCG@10 on dynamic targets per bucket of recent habit share) and occupancy vs habit share,
   written to `--report` with the PNGs beside it, and logged to the parent MLflow run.

`--quick` runs a tiny version of the same machinery (about 2 minutes) and writes its report under
the work directory, never over docs/STUDY.md. `--resume` reuses finished runs found in the work
directory (each run's summary.json), so an interrupted study continues where it stopped.

`--jobs n` (`make study`: 2) trains in n processes at once, each a `--part i/n` below with
cpu_count / n torch threads, then writes the report from their runs: the whole grid took 74 min on
2 cores this way (143 min of training summed over its 34 runs; docs/STUDY.md).

A part of the grid: `--ratios`, `--archs`, `--ablations`, `--variants` replace the grid's lists (a
report of a part needs its own `--report` path). `--part i/n` trains every n-th run from the i-th
and writes no report, so n processes can share one work directory; a last `--resume` run with the
same grid then writes the report from their runs:

    python -m sinkrec.study --ratios 0.7 --archs sinkrec gdn --ablations --variants repeat_gate \
        --part 0/2 --report docs/results/x.md &   # and --part 1/2 beside it, then without --part
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG = Path("conf/train/sinkbench_study.yaml")
EXPERIMENT = "sinkbench-study"  # the MLflow experiment of every study run (datasets differ per ratio)
ANALYSIS_KEYS = {"excess_occupancy", "excess_occupancy_other"}  # a stored summary without these is re-analysed
MEMORY_KEYS = {"km_alignment", "read_removal"}  # ... and, for a run with SinkRec's memory, without these
WINDOW = 64  # "recent window" of the sink curve: the last WINDOW events a user read before the target
BUCKETS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 1.0001)  # habit share of the recent window
MIN_BUCKET = 30  # a bucket needs this many dynamic targets to be plotted
# SinkRec's ablation switches (SINKREC.md section 5), each run at the highest ratio. `memory: off` is
# not run separately: `arch: gdn` IS SinkRec with memory off (sinkrec.model.build_model), so the
# GDN runs at that ratio are that ablation, bit for bit.
ABLATIONS = {
    "no_purify_write": ["--model.config.purify_write", "false"],
    "no_diff_read": ["--model.config.diff_read", "false"],
    "no_temporal": ["--model.config.temporal", "false"],
    "one_loop": ["--model.config.n_loops", "1"],
}
# Design changes tried when the spec's SinkRec did not get there (docs/MODEL.md), run like ablations.
VARIANTS = {
    "coverage_sup": ["--model.config.coverage_weight", "1.0"],  # rho supervised by recurring RVQ codes
    # rho sees whether the item occurred earlier in the sequence (task loss only) ...
    "repeat_gate": ["--model.config.repeat_gate", "true"],
    # ... and is also supervised towards it
    "repeat_gate_sup": ["--model.config.repeat_gate", "true", "--model.config.coverage_weight", "1.0",
                        "--model.config.coverage_target", "items"],
    # rho starts half open (b_rho = 0 instead of -2): does the task loss keep the purified write or close it?
    "rho_open": ["--model.config.rho_bias_init", "0.0"],
}
SWITCHES = {**ABLATIONS, **VARIANTS}
LABEL = {"sinkrec": "SinkRec", "gdn": "GDN (= memory off)", "sasrec": "SASRec", "elastic": "ELASTIC",
         **{f"sinkrec+{a}": f"SinkRec, {a.replace('_', ' ')}" for a in ABLATIONS},
         **{f"gdn+{a}": f"GDN, {a.replace('_', ' ')}" for a in ABLATIONS},
         "sinkrec+coverage_sup": "SinkRec + coverage supervision",
         "sinkrec+repeat_gate": "SinkRec + repeat gate",
         "sinkrec+repeat_gate_sup": "SinkRec + repeat gate, supervised",
         "sinkrec+rho_open": "SinkRec, ρ half open at init"}


@dataclass(frozen=True)
class Grid:
    name: str
    ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    archs: tuple[str, ...]
    ablations: tuple[str, ...]
    users: int
    items: int
    epochs: int
    max_len: int
    extra: tuple[str, ...] = ()  # more `sinkrec fit` overrides, the same for every run
    variants: tuple[str, ...] = ()  # design changes (VARIANTS), run at the highest ratio
    ablated: tuple[str, ...] = ("sinkrec",)  # the archs the ablations are run for (variants: SinkRec only)


FULL = Grid("sinkbench", ratios=(0.1, 0.4, 0.7), seeds=(1, 2), archs=("sinkrec", "gdn", "sasrec", "elastic"),
            ablations=tuple(ABLATIONS), users=3000, items=2000, epochs=8, max_len=256,
            # the variant that engages the memory (docs/MODEL.md); the others are run with --variants
            variants=("repeat_gate_sup",))
QUICK = Grid("sinkbench-quick", ratios=(0.1, 0.7), seeds=(1,), archs=("sinkrec", "gdn", "sasrec", "elastic"),
             ablations=("one_loop",), users=300, items=400, epochs=1, max_len=64,
             extra=("--data.batch_size", "16", "--optimizer.warmup_steps", "5", "--model.config.n_codes", "32"))


@dataclass(frozen=True)
class Run:
    ratio: float
    model: str  # "sinkrec" | "gdn" | "sasrec" | "elastic" | "<arch>+<ablation or variant>"
    seed: int

    @property
    def arch(self) -> str:
        return self.model.split("+")[0]

    @property
    def tag(self) -> str:
        return f"r{self.ratio}-{self.model}-s{self.seed}"


def grid_runs(g: Grid) -> list[Run]:
    runs = [Run(r, a, s) for r in g.ratios for a in g.archs for s in g.seeds]
    top = max(g.ratios)
    return runs + [Run(top, m, s) for m in top_models(g) for s in g.seeds]


def top_models(g: Grid) -> list[str]:
    """The ablated and changed models run at the highest ratio only, e.g. "sinkrec+one_loop"."""
    return [*(f"{arch}+{a}" for arch in g.ablated for a in g.ablations), *(f"sinkrec+{v}" for v in g.variants)]


def dataset_root(g: Grid, ratio: float) -> Path:
    return Path("data/processed") / f"{g.name}-r{ratio}"


def prepare_data(g: Grid, ratio: float) -> Path:
    """Generate and preprocess one SinkBench log (deterministic; seconds). Returns the processed dir.

    Several `--part`s start at once and all prepare every ratio: generation and preprocessing run
    under the processed output's lock (`pipeline.run`, wait=True), so the first part builds and the
    others wait, regenerate the same bytes and find the output up to date (the raw log's sha256 is
    in the manifest)."""
    from pipeline.config import load
    from pipeline.run import run

    raw = Path("data/raw") / f"{g.name}-r{ratio}" / "events.parquet"
    out = dataset_root(g, ratio)
    cfg = load(["--config", "conf/pipeline/sinkbench.yaml", "--input", str(raw), "--out", str(out),
                "--name", out.name, "--overwrite", "true"])

    def synth() -> None:
        subprocess.run([sys.executable, "-m", "pipeline.synth", "--users", str(g.users), "--items", str(g.items),
                        "--seed", "0", "--repeat-ratio", str(ratio), "--out", str(raw)],
                       check=True, stdout=subprocess.DEVNULL)

    return run(cfg, log=lambda message: None, wait=True, before=synth)


# ---------------------------------------------------------------- per-user analysis of one run
def load_model(ckpt: str):
    from sinkrec.lit_module import SeqRecModule

    return SeqRecModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()


def target_columns(batch: dict, hidden, table) -> dict:
    """One left-padded batch's per-user columns (tensors): the rank of its one target (the last
    position, leave-one-out), the target's kind, and the habit share of the last WINDOW inputs and of
    all of them. `hidden` [B, T, D] is the model's output, `table` its item embeddings. Shared by
    the test split's analysis and the held-out users' scoring (sinkrec.heldout)."""
    from sinkrec.metrics import target_ranks

    real = batch["items"] != 0
    habit = (batch["input_kind"] == 1) & real
    recent = real[:, -WINDOW:].sum(1).clamp_min(1)
    return {"user_idx": batch["user_idx"], "rank": target_ranks(hidden[:, -1], table, batch["targets"][:, -1]),
            "kind": batch["target_kind"][:, -1], "recent_habit_share": habit[:, -WINDOW:].sum(1) / recent,
            "habit_share": habit.sum(1) / real.sum(1).clamp_min(1)}


def analyse(ckpt: str, root: Path, max_len: int, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per test user of `root`: rank, target kind, recent habit share and the sink measures."""
    import torch

    from sinkrec.data import SeqRecDataModule
    from sinkrec.diagnostics import per_user

    model = load_model(ckpt)
    dm = SeqRecDataModule(root=str(root), max_len=max_len, eval_batch_size=batch_size, verify="off")
    cols: dict[str, list[np.ndarray]] = {}
    code_counts = None  # [passes, levels, n_codes]
    with torch.no_grad():
        table = model.item_embeddings()
        for batch in dm.loader("test", rank=0, world=1):
            items, real = batch["items"], batch["items"] != 0
            out = model(items, batch["ts"], return_states=True)
            rec = target_columns(batch, out.hidden, table)
            habit = (batch["input_kind"] == 1) & real
            if out.states:
                rec.update(per_user(out.states, items, habit))
                if out.states[0].get("codes") is not None:  # [B, T, L] per pass: which codes real events use
                    if code_counts is None:
                        code_counts = torch.zeros(len(out.states), model.cfg.n_levels, model.cfg.n_codes)
                    for p, st in enumerate(out.states):
                        for level in range(model.cfg.n_levels):
                            code_counts[p, level] += torch.bincount(st["codes"][..., level][real],
                                                                    minlength=model.cfg.n_codes).float()
            for k, v in rec.items():
                cols.setdefault(k, []).append(v.float().numpy() if v.is_floating_point() else v.numpy())
    a = {k: np.concatenate(v) for k, v in cols.items()}
    if code_counts is not None:  # "are the codes used?": share of codes used, and perplexity / n_codes
        prob = code_counts / code_counts.sum(-1, keepdim=True)
        perplexity = torch.exp(-(prob * prob.clamp_min(1e-12).log()).sum(-1))  # [passes, levels]
        n = len(a["rank"])  # stored per user (a constant column) so that every entry pools like the others
        for level in range(code_counts.shape[1]):
            a[f"code_use_l{level}"] = np.full(n, (code_counts[:, level] > 0).float().mean(-1).mean().item())
            a[f"code_perplexity_l{level}"] = np.full(n, perplexity[:, level].mean().item() / model.cfg.n_codes)
    return a


def ndcg10(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)


def paired_gain(a: dict[str, np.ndarray], b: dict[str, np.ndarray], kind: int = 0, n_boot: int = 2000,
                seed: int = 0) -> tuple[float, float, float, int]:
    """Run a's relative NDCG@10 gain over run b on the test targets of `kind` (0 dynamic, 1 habit), with
    a 95% paired bootstrap interval: resample those users (each scored by both runs) n_boot times.
    The interval is the test-set sampling noise of ONE seed's comparison; the spread over seeds adds
    the training noise. -> (gain, low, high, number of targets)."""
    ia, ib = np.argsort(a["user_idx"], kind="stable"), np.argsort(b["user_idx"], kind="stable")
    if not (np.array_equal(a["user_idx"][ia], b["user_idx"][ib]) and np.array_equal(a["kind"][ia], b["kind"][ib])):
        raise ValueError("paired_gain: the two runs did not score the same test users and targets")
    m = a["kind"][ia] == kind
    na, nb = ndcg10(a["rank"][ia][m]), ndcg10(b["rank"][ib][m])
    if not len(na) or nb.sum() == 0:
        return float("nan"), float("nan"), float("nan"), len(na)
    idx = np.random.default_rng(seed).integers(0, len(na), (n_boot, len(na)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = na[idx].mean(1) / nb[idx].mean(1) - 1
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return float(na.mean() / nb.mean() - 1), float(low), float(high), len(na)


def summarise(a: dict[str, np.ndarray]) -> dict[str, float]:
    """One run's numbers from its per-user analysis."""
    nd, hit = ndcg10(a["rank"]), (a["rank"] <= 10).astype(float)
    s: dict[str, float] = {"ndcg_10": nd.mean(), "hr_10": hit.mean(), "users": float(len(nd))}
    for name, code in (("habit", 1), ("dynamic", 0)):
        m = a["kind"] == code
        s[f"{name}/ndcg_10"], s[f"{name}/hr_10"], s[f"{name}/count"] = nd[m].mean(), hit[m].mean(), float(m.sum())
    for k in ("excess_occupancy", "excess_occupancy_other", "effective_rank", "write_share", "readout_bias",
              "rho_repeated", "rho_other", "km_alignment", "km_alignment_other", "read_removal", "code_use_l0", "code_use_l1", "code_perplexity_l0", "code_perplexity_l1"):
        if k in a:
            s[k] = float(np.nanmean(a[k]))
    return {k: float(v) for k, v in s.items()}


def bucket_curve(a: dict[str, np.ndarray], value: str, dynamic_only: bool) -> list[tuple[float, int]]:
    """Mean of `value` ("ndcg_10" or a per-user measure) per bucket of recent habit share."""
    share = a["recent_habit_share"]
    vals = ndcg10(a["rank"]) if value == "ndcg_10" else a[value]
    keep = (a["kind"] == 0) if dynamic_only else np.ones(len(share), bool)
    out = []
    for lo, hi in itertools.pairwise(BUCKETS):
        m = keep & (share >= lo) & (share < hi) & np.isfinite(vals)
        out.append((float(vals[m].mean()) if m.sum() >= MIN_BUCKET else float("nan"), int(m.sum())))
    return out


# ---------------------------------------------------------------- one run end to end
def train_and_analyse(g: Grid, run: Run, parent: str, uri: str, work: Path, resume: bool) -> dict:
    from mlflow.tracking import MlflowClient

    from sinkrec.compare import run_one

    out = work / run.tag
    summary_file = out / "summary.json"
    if resume and summary_file.exists():
        row = json.loads(summary_file.read_text())
        if row.get("run_id"):  # nest it under this study's parent run
            MlflowClient(uri).set_tag(row["run_id"], "mlflow.parentRunId", parent)
        needed = ANALYSIS_KEYS | (MEMORY_KEYS if run.arch == "sinkrec" else set())
        if not row.get("summary") or needed <= set(row["summary"]) or run.arch in ("sasrec", "elastic"):
            print(f"[study] {run.tag}: reusing {summary_file}", flush=True)
            return row
        print(f"[study] {run.tag}: re-analysing (the stored analysis predates a measure)", flush=True)
        return analyse_and_log(g, run, row, out, uri)
    root = dataset_root(g, run.ratio)
    extra = ["--data.root", str(root), "--model.config.arch", run.arch, "--trainer.max_epochs", str(g.epochs),
             "--data.max_len", str(g.max_len), "--model.evaluation.diag_users", "32", *g.extra]
    for a in run.model.split("+")[1:]:
        extra += SWITCHES[a]
    client = MlflowClient(uri)
    if resume and (out / "metrics_test.json").exists():  # trained and tested, not yet analysed
        final = json.loads((out / "metrics_test.json").read_text())
        info = client.get_run(final["run_id"]).info
        row = {"tag": run.tag, "config": str(CONFIG), "seed": run.seed, "rc": 0, "run_id": final["run_id"],
               "metrics": final["metrics"], "wall_s": ((info.end_time or info.start_time) - info.start_time) / 1e3,
               "peak_rss_gib": float("nan")}
        client.set_tag(final["run_id"], "mlflow.parentRunId", parent)
        print(f"[study] {run.tag}: reusing the trained run {final['run_id'][:8]}", flush=True)
    else:
        row = run_one(CONFIG, run.seed, run.tag, parent, EXPERIMENT, uri, extra, work)
    row.update(dataclasses.asdict(run), model=run.model)
    if row["rc"] != 0 or "metrics" not in row:
        return row
    return analyse_and_log(g, run, row, out, uri)


def analyse_and_log(g: Grid, run: Run, row: dict, out: Path, uri: str) -> dict:
    """Per-user analysis of a trained run's best checkpoint; summary logged to its MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    final = json.loads((out / "metrics_test.json").read_text())
    t0 = time.perf_counter()
    a = analyse(final["best_checkpoint"], dataset_root(g, run.ratio), g.max_len)
    np.savez_compressed(out / "analysis.npz", **a)
    row["summary"] = summarise(a)
    row["analysis_s"] = time.perf_counter() - t0
    # the recomputed metric must be the trainer's own (same checkpoint, same test users)
    trainer_ndcg = row["metrics"]["test/ndcg_10"]
    row["consistent"] = abs(row["summary"]["ndcg_10"] - trainer_ndcg) < 1e-6
    if not row["consistent"]:
        print(f"[study] {run.tag}: WARNING analysis NDCG@10 {row['summary']['ndcg_10']:.6f} != trainer's "
              f"{trainer_ndcg:.6f}", flush=True)
    for k, v in row["summary"].items():
        if math.isfinite(v):
            client.log_metric(row["run_id"], f"study/{k}", v)
    client.log_artifact(row["run_id"], str(out / "analysis.npz"), "study")
    (out / "summary.json").write_text(json.dumps(row, indent=2))
    return row


# ---------------------------------------------------------------- report
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def fmt(xs: list[float], digits: int = 4) -> str:
    m, s = mean_std(xs)
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if math.isfinite(s) else "")


TABLE = [("ndcg_10", "NDCG@10"), ("hr_10", "HR@10"), ("habit/ndcg_10", "NDCG@10 habit"),
         ("dynamic/ndcg_10", "NDCG@10 dynamic"), ("dynamic/hr_10", "HR@10 dynamic"),
         ("excess_occupancy", "excess occ. habit"), ("excess_occupancy_other", "excess occ. dynamic (control)"),
         ("write_share", "write share"),
         ("rho_repeated", "ρ habit"), ("rho_other", "ρ dynamic"),
         ("km_alignment", "memory key in habit subspace"), ("km_alignment_other", "memory key in dynamic subspace"),
         ("read_removal", "diff read: habit cos removed"), ("code_use_l0", "codes used (level 0)"),
         ("code_perplexity_l0", "code perplexity / n_codes (level 0)")]


def group(rows: list[dict]) -> dict[tuple[float, str], list[dict]]:
    out: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        if r.get("summary"):
            out.setdefault((r["ratio"], r["model"]), []).append(r)
    return out


def results_table(groups: dict, keys: list[tuple[float, str]]) -> list[str]:
    head = ["ratio", "model", "seeds", *(c for _, c in TABLE), "best epoch (0-based)", "min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        rs = groups.get(key)
        if not rs:
            continue
        cells = [f"{key[0]}", LABEL.get(key[1], key[1]), str(len(rs))]
        cells += [fmt([r["summary"].get(k, float("nan")) for r in rs], 3 if k not in ("ndcg_10",) else 4)
                  if k in rs[0]["summary"] else "-" for k, _ in TABLE]
        cells += [", ".join(str(r.get("best_epoch", "?")) for r in rs), f"{statistics.fmean(r['wall_s'] for r in rs) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def load_analyses(rows: list[dict], work: Path) -> dict[str, dict[str, np.ndarray]]:
    """tag -> the per-user analysis of every analysed run (read once per report)."""
    return {r["tag"]: dict(np.load(work / r["tag"] / "analysis.npz")) for r in rows if r.get("summary")}


def seed_curves(g: Grid, analyses: dict, arch: str, value: str, dyn: bool) -> list[list[tuple[float, int]]]:
    """bucket_curve of `value` for `arch`, one per seed, with the users of every ratio pooled."""
    curves = []
    for seed in g.seeds:
        tags = [Run(x, arch, seed).tag for x in g.ratios if Run(x, arch, seed).tag in analyses]
        if tags and (value == "ndcg_10" or value in analyses[tags[0]]):
            pooled = {k: np.concatenate([analyses[t][k] for t in tags]) for k in analyses[tags[0]]}
            curves.append(bucket_curve(pooled, value, dyn))
    return curves


def plots(g: Grid, rows: list[dict], analyses: dict, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    colors = {"sinkrec": "C0", "gdn": "C1", "sasrec": "C2", "elastic": "C3"}
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    # 1. metric vs repeat ratio
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (k, title) in zip(axes, (("ndcg_10", "NDCG@10, all targets"), ("dynamic/ndcg_10", "NDCG@10, dynamic targets"),
                                     ("habit/ndcg_10", "NDCG@10, habit targets"))):
        for arch in g.archs:
            ms = [mean_std([r["summary"][k] for r in groups.get((x, arch), [])]) for x in g.ratios]
            ax.errorbar(g.ratios, [m for m, _ in ms], yerr=[0 if not math.isfinite(s) else s for _, s in ms],
                        marker="o", capsize=3, label=LABEL[arch], color=colors[arch])
        ax.set_xlabel("repeat ratio (SinkBench)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    files.append(outdir / "metric_vs_ratio.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    # 2. every model at the highest ratio (the ablations and design variants beside SinkRec and GDN)
    top = max(g.ratios)
    models = [m for m in ("sinkrec", "gdn", *top_models(g)) if groups.get((top, m))]
    if models:
        fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(models) + 2), 4))
        width = 0.8 / 3
        for j, (k, title) in enumerate((("ndcg_10", "all targets"), ("habit/ndcg_10", "habit targets"),
                                        ("dynamic/ndcg_10", "dynamic targets"))):
            ms = [mean_std([r["summary"][k] for r in groups[(top, m)]]) for m in models]
            ax.bar([i + (j - 1) * width for i in range(len(models))], [m for m, _ in ms], width,
                   yerr=[0 if not math.isfinite(sd) else sd for _, sd in ms], capsize=3, label=title)
        ax.set_xticks(range(len(models)), [LABEL.get(m, m).replace(", ", ",\n") for m in models], fontsize=7)
        ax.set_ylabel("NDCG@10 (mean ± std over seeds)")
        ax.set_title(f"every model at repeat ratio {top}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(outdir / "models_at_top_ratio.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # 3. the sink curve and 4. occupancy vs habit share: users pooled over ratios, mean +- std over seeds
    centers = [(lo + min(hi, 1.0)) / 2 for lo, hi in itertools.pairwise(BUCKETS)]
    recurrent = tuple(a for a in g.archs if a in ("sinkrec", "gdn"))  # the archs with a delta-rule state
    for values, dyn, name, ylabel, archs in (
            (("ndcg_10",), True, "sink_curve.png", "NDCG@10 on dynamic targets", g.archs),
            (("excess_occupancy", "excess_occupancy_other"), False, "occupancy_vs_share.png",
             "excess occupancy (1 = fair share)", recurrent)):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for arch in archs:
            for value, style in zip(values, ("-", "--")):
                per_seed = [[m for m, _ in curve] for curve in seed_curves(g, analyses, arch, value, dyn)]
                if not per_seed:
                    continue
                arr = np.array(per_seed)
                mean = np.nanmean(arr, 0)
                std = np.nanstd(arr, 0, ddof=1) if len(per_seed) > 1 else np.zeros_like(mean)
                label = LABEL[arch] + ("" if len(values) == 1 else
                                       (", habit items" if value == "excess_occupancy" else ", dynamic items (control)"))
                ax.errorbar(centers, mean, yerr=std, marker="o", capsize=3, label=label, color=colors[arch],
                            linestyle=style)
        ax.set_xlabel(f"habit share of the last {WINDOW} events (ground truth)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(outdir / name)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def curve_table(g: Grid, analyses: dict, value: str, dyn: bool, archs) -> list[str]:
    """The plotted curve as numbers: per bucket, mean over seeds (and the target count of seed 1)."""
    head = ["model", *(f"[{lo:.2f}, {min(hi, 1):.2f})" for lo, hi in itertools.pairwise(BUCKETS))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in archs:
        curves = seed_curves(g, analyses, arch, value, dyn)
        per_seed = [[m for m, _ in curve] for curve in curves]
        counts = [n for _, n in curves[0]] if curves else None
        if per_seed:
            cols = np.array(per_seed).T
            lines.append("| " + " | ".join([LABEL[arch], *(f"{fmt(list(c), 3)} (n={n})" for c, n in zip(cols, counts))]) + " |")
    return lines


def verdict(g: Grid, groups: dict, model: str = "sinkrec", analyses: dict | None = None) -> list[str]:
    """The issue's target for `model` vs GDN at the highest ratio: >= +10% NDCG@10 on dynamic targets
    on average, better on every seed, and lower excess occupancy. With `analyses` (tag -> per-user
    analysis), also each seed's paired bootstrap interval of the gain (paired_gain)."""
    top = max(g.ratios)
    name = LABEL.get(model, model)
    s = {r["seed"]: r["summary"]["dynamic/ndcg_10"] for r in groups.get((top, model), [])}
    d = {r["seed"]: r["summary"]["dynamic/ndcg_10"] for r in groups.get((top, "gdn"), [])}
    seeds = sorted(set(s) & set(d))
    if not seeds:
        return [f"(no paired {name} / GDN runs at the highest ratio)"]
    gains = [s[k] / d[k] - 1 for k in seeds]
    occ_s = [r["summary"].get("excess_occupancy", float("nan")) for r in groups[(top, model)]]
    occ_g = [r["summary"].get("excess_occupancy", float("nan")) for r in groups[(top, "gdn")]]
    m, sd = mean_std(gains)
    met = m >= 0.10 and min(gains) > 0 and mean_std(occ_s)[0] < mean_std(occ_g)[0]
    ci_line = []
    for kind, what in ((0, "dynamic"), (1, "habit")):
        ci, n = [], 0
        for k in seeds if analyses else ():
            ta, tb = Run(top, model, k).tag, Run(top, "gdn", k).tag
            if ta in analyses and tb in analyses:
                gain, lo, hi, n = paired_gain(analyses[ta], analyses[tb], kind)
                ci.append(f"seed {k} {gain:+.1%} [{lo:+.1%}, {hi:+.1%}]")
        if ci:
            ci_line.append(f"- {what} targets (95% paired bootstrap over the {n} {what} test users, 2,000 "
                           f"resamples): {'; '.join(ci)}")
    if ci_line:
        ci_line = ["", ("Each seed's gain with its test-set noise (a seed whose interval holds 0 is not a "
                        "difference these test users can show; the spread over seeds adds the training noise):"),
                   *ci_line]
    return [f"At repeat ratio {top}: {name} vs GDN, NDCG@10 on dynamic targets, relative gain per seed "
            f"{', '.join(f'{x:+.1%}' for x in gains)} (mean {m:+.1%}" + (f" ± {sd:.1%}" if math.isfinite(sd) else "")
            + f"); excess occupancy {name} {fmt(occ_s, 3)} vs GDN {fmt(occ_g, 3)}.",
            (f"Target (≥ +10% on dynamic targets, every seed better, lower excess occupancy): "
            f"**{'met' if met else 'not met'}**."), *ci_line]


def heldout_analyses(g: Grid, rows: list[dict], work: Path, users: int) -> dict[str, dict[str, np.ndarray]]:
    """tag -> the per-user analysis of the run's best checkpoint on `users` held-out SinkBench users
    (sinkrec.heldout), for every run at the highest ratio; cached as <work>/<tag>/heldout<users>.npz,
    which records the checkpoint it scored (path, size, mtime): a retrained run is scored again."""
    from sinkrec import heldout

    top, out, seqs = max(g.ratios), {}, None
    for r in rows:
        if not r.get("summary") or r["ratio"] != top:
            continue
        cache = work / r["tag"] / f"heldout{users}.npz"
        ckpt = json.loads((work / r["tag"] / "metrics_test.json").read_text())["best_checkpoint"]
        st = os.stat(ckpt)
        stamp = f"{ckpt}|{st.st_size}|{st.st_mtime_ns}"
        cached = dict(np.load(cache)) if cache.exists() else {}
        if str(cached.get("checkpoint", "")) != stamp:
            if seqs is None:
                root = dataset_root(g, top)
                seqs = heldout.load_sequences(heldout.heldout_log(root, users, g.items, top), root)
            t0 = time.perf_counter()
            cached = {"checkpoint": np.array(stamp), **heldout.score(ckpt, seqs, g.max_len)}
            np.savez_compressed(cache, **cached)
            print(f"[study] {r['tag']}: scored {users} held-out users ({time.perf_counter() - t0:.0f} s)", flush=True)
        out[r["tag"]] = {k: v for k, v in cached.items() if k != "checkpoint"}
    return out


def heldout_section(g: Grid, rows: list[dict], heldout: dict, users: int) -> list[str]:
    """The verdict and the table again, on the held-out users (the occupancy columns stay the test split's)."""
    if not heldout:
        return []
    from sinkrec.heldout import HELDOUT_SEED

    top = max(g.ratios)
    pseudo = [{**r, "summary": {**{k: v for k, v in r["summary"].items() if k not in ("ndcg_10", "hr_10")
                                   and not k.startswith(("habit/", "dynamic/"))}, **summarise(heldout[r["tag"]])}}
              for r in rows if r["tag"] in heldout]
    groups = group(pseudo)
    n = {k: int(v) for k, v in summarise(next(iter(heldout.values()))).items() if k.endswith("/count")}
    return [f"## Held-out users (repeat ratio {top})", "",
            (f"The best checkpoint of every run at ratio {top}, scored on {users:,} users it never saw: "
             f"`pipeline.synth --users {users} --items {g.items} --seed {HELDOUT_SEED} --repeat-ratio {top}`, "
             "items mapped through the training vocabulary (`sinkrec/heldout.py`); nothing is trained or "
             f"selected on them. {n.get('dynamic/count', 0):,} dynamic and {n.get('habit/count', 0):,} habit "
             "targets, against the test split's one per user. Excess occupancy below is the test split's."), "",
            *verdict(g, groups, analyses=heldout), "",
            *(line for v in g.variants for line in ("", *verdict(g, groups, f"sinkrec+{v}", heldout))), "",
            *results_table(groups, [(top, "sinkrec"), (top, "gdn"), *((top, a) for a in g.archs if a not in
                                                                      ("sinkrec", "gdn")),
                                    *((top, m) for m in top_models(g))]), "",
            (f"The sink curve on the held-out users: NDCG@10 on dynamic targets by habit share of the last {WINDOW} "
             "events (mean ± std over seeds; n = dynamic targets in the bucket):"), "",
            *curve_table(g, heldout, "ndcg_10", True, g.archs), ""]


def report(g: Grid, rows: list[dict], work: Path, path: Path, command: str, parent: str, uri: str,
           wall: float, heldout_users: int = 0) -> str:
    from sinkrec.hardware import machine

    groups = group(rows)
    figdir = path.parent / ("study" if path.name == "STUDY.md" else f"{path.stem}-figures")
    analyses = load_analyses(rows, work)
    heldout = heldout_analyses(g, rows, work, heldout_users) if heldout_users else {}
    files = plots(g, rows, analyses, figdir)
    main_keys = [(x, a) for x in g.ratios for a in g.archs]
    top = max(g.ratios)
    abl_keys = [(top, "sinkrec"), (top, "gdn"), *((top, m) for m in top_models(g))]
    failed = [r["tag"] for r in rows if not r.get("summary")]
    inconsistent = [r["tag"] for r in rows if r.get("summary") and not r.get("consistent")]
    rel = lambda p: os.path.relpath(p, path.parent)
    md = [
        f"# SinkBench study ({g.name})", "",
        (f"- command: `{command}`; {len(rows)} runs, {sum(r.get('wall_s', 0.0) for r in rows) / 60:.0f} min of "
         f"training summed over the runs; this command: {wall / 60:.0f} min wall (a reused run counts 0)"),
        f"- date: {dt.datetime.now().isoformat(timespec='minutes')}; machine: {machine()}",
        (f"- data: `pipeline.synth --users {g.users} --items {g.items} --seed 0 --repeat-ratio R`, R in "
        f"{list(g.ratios)}; leave-one-out split (test = each user's last event; its `kind` makes it a "
        "habit or a dynamic target)"),
        (f"- training: `{CONFIG}` + `--trainer.max_epochs {g.epochs} --data.max_len {g.max_len}` "
        f"{shlex.join(g.extra)}; seeds {list(g.seeds)}; the checkpoint with the best validation NDCG@10 "
        "is tested once"),
        f"- MLflow: parent run `{parent}` in experiment `{EXPERIMENT}` (store `{uri}`); every run is a child",
        "- history items stay candidates (habits repeat, so the right answer is often a seen item)",
        ("- excess occupancy: energy of the final state in the top-4 subspace of the habit items' mean keys,"
        " over the 4/32 a random subspace holds (docs/MODEL.md); 1 = no sink. write share: habit events'"
        " share of the write strength over their share of events. ρ: memory coverage (0 without memory)."),
        ("- what the differential read subtracts (SinkRec): memory key in habit subspace = the memory keys' energy"
        " in that top-4 subspace over 4/32 (1 = no preference, 8 = inside it; the dynamic items' subspace as"
        " control); habit cos removed = cos(read-out, habit items' mean value) without minus with the"
        " subtraction, at the position that scores the target (> 0: the read moves away from the habits)."),
        "",
        *( [f"**Failed runs:** {', '.join(failed)}", ""] if failed else []),
        *( [f"**Analysis disagrees with the trainer's test metric:** {', '.join(inconsistent)}", ""]
           if inconsistent else ["Every run's recomputed test NDCG@10 equals the trainer's own (|Δ| < 1e-6).", ""]),
        "## Verdict", "", *verdict(g, groups, analyses=analyses), "",
        *(line for v in g.variants for line in ("", *verdict(g, groups, f"sinkrec+{v}", analyses))), "",
        "## Grid (mean ± sample std over seeds)", "", *results_table(groups, main_keys), "",
        f"## Ablations at repeat ratio {top}", "",
        "`memory: off` is the GDN row: `arch: gdn` builds SinkRec with `memory=False` (the same code path).",
        "`coverage supervision` and `repeat gate` are not ablations but design changes (docs/MODEL.md):",
        "rho trained to open on recurring RVQ code tuples (`--model.config.coverage_weight 1.0`); rho given",
        "a learned term for \"this item occurred earlier in the sequence\" (`--model.config.repeat_gate true`),",
        "learned by the task loss alone or also supervised towards item recurrence (`, supervised`:",
        "`--model.config.coverage_weight 1.0 --model.config.coverage_target items`).", "",
        *results_table(groups, abl_keys), "",
        *heldout_section(g, rows, heldout, heldout_users),
        "## Figures", "",
        *(f"![{f.stem}]({rel(f)})" for f in files), "",
        f"### The sink curve: NDCG@10 on dynamic targets by habit share of the last {WINDOW} events", "",
        ("Users of all ratios pooled per model and seed; mean ± std over seeds; n = dynamic targets in the "
        f"bucket (first seed); buckets with < {MIN_BUCKET} targets are left out."), "",
        *curve_table(g, analyses, "ndcg_10", True, g.archs), "",
        "### Excess occupancy by habit share of the last 64 events (all test users)", "",
        "Habit items' subspace:", "",
        *curve_table(g, analyses, "excess_occupancy", False, ("sinkrec", "gdn")), "",
        "Control, the same measure over the dynamic items of the same windows:", "",
        *curve_table(g, analyses, "excess_occupancy_other", False, ("sinkrec", "gdn")), "",
        "## Runs", "",
        "| run | MLflow run | test NDCG@10 (trainer) | best epoch | wall min |", "|---|---|---|---|---|",
        *(f"| {r['tag']} | `{r.get('run_id', '-')[:8]}` | "
          f"{r['metrics']['test/ndcg_10']:.4f} | {r.get('best_epoch', '?')} | {r['wall_s'] / 60:.1f} |"
          if r.get("metrics") else f"| {r['tag']} | - | FAILED (exit {r['rc']}) | - | - |" for r in rows), "",
    ]
    text = carry_hand_written(path.read_text() if path.exists() else "", "\n".join(md))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (path.parent / (path.stem + ".json")).write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    import mlflow

    for f in files:
        mlflow.log_artifact(str(f), "figures")
    mlflow.log_text(text, "STUDY.md")
    return text


HAND_WRITTEN = "## Reading the results (written by hand"  # docs/STUDY.md's section below the generated part
CARRIED = "> Carried over from the report of "


def carry_hand_written(old: str, new: str) -> str:
    """The new generated report plus the hand-written reading of the report it replaces, if that has
    one, marked as written for the run it was written for (a rerun must not silently delete the
    analysis, nor let it pass for a reading of the new numbers)."""
    if HAND_WRITTEN not in old:
        return new
    heading, _, body = old[old.index(HAND_WRITTEN):].partition("\n")
    body = body.lstrip("\n")
    if not body.startswith(CARRIED):  # carried once already: its note names the run it was written for
        date = next((line.removeprefix("- date: ").split(";")[0] for line in old.split("\n")
                     if line.startswith("- date: ")), "an earlier run")
        body = (f"{CARRIED}{date}: it was written for that run's numbers. Check it against the tables "
                f"above, then rewrite it and delete this line.\n\n{body}")
    return f"{new.rstrip()}\n\n{heading}\n\n{body}"


def best_epochs(rows: list[dict], uri: str) -> None:
    """The epoch whose checkpoint was tested (best validation NDCG@10), from each run's history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for r in rows:
        if r.get("run_id") and "best_epoch" not in r:
            hist = client.get_metric_history(r["run_id"], "val/ndcg_10")
            if hist:
                r["best_epoch"] = max(range(len(hist)), key=lambda i: hist[i].value)



def part_commands(argv: list[str], jobs: int, report: Path) -> list[list[str]]:
    """`--jobs n`: the n `--part i/n` command lines of the same grid (argv without --jobs)."""
    rest, skip = [], False
    for a in argv:
        if skip or a == "--jobs" or a.startswith("--jobs="):
            skip = a == "--jobs"
            continue
        rest.append(a)
    if "--report" not in rest and not any(a.startswith("--report=") for a in rest):
        rest += ["--report", str(report)]  # a part writes no report, but a part of the grid must name one
    return [[sys.executable, "-m", "sinkrec.study", *rest, "--part", f"{i}/{jobs}"] for i in range(jobs)]


def train_parts(argv: list[str], jobs: int, report: Path) -> list[int]:
    """`--jobs n`: run the n parts at once, cpu_count / n torch threads each; the parts that failed.
    Each part has its own process group: Ctrl-C or SIGTERM here stops the parts and their trainings."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    procs = [subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, start_new_session=True)
             for cmd in part_commands(argv, jobs, report)]
    print(f"[study] {jobs} parts training, {threads} thread(s) each: pids {' '.join(str(pr.pid) for pr in procs)}",
          flush=True)

    def stop(signum: int, frame: object) -> None:  # `kill` (SIGTERM) unwinds like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return [i for i, pr in enumerate(procs) if pr.wait() != 0]
    except BaseException:  # no part keeps training without its parent
        for pr in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pr.pid, signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m sinkrec.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny grid (~2 min): checks the machinery")
    p.add_argument("--resume", action="store_true", help="reuse finished runs found in the work directory")
    p.add_argument("--work", type=Path, default=None, help="per-run outputs (default outputs/study[-quick])")
    p.add_argument("--report", type=Path, default=None,
                   help="markdown report (default docs/STUDY.md; --quick: <work>/STUDY.md)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="replace the grid's repeat ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="replace the grid's seeds (the whole grid keeps 2 to fit ~2 h on 2 cores)")
    p.add_argument("--archs", nargs="+", default=None, choices=("sinkrec", "gdn", "sasrec", "elastic"))
    p.add_argument("--epochs", type=int, default=None,
                   help="replace the grid's epochs (the cosine schedule spans them); use a fresh --work")
    p.add_argument("--ablations", nargs="*", default=None, choices=tuple(ABLATIONS), help="at the highest ratio")
    p.add_argument("--variants", nargs="*", default=None, choices=tuple(VARIANTS), help="at the highest ratio")
    p.add_argument("--ablate-archs", dest="ablated", nargs="+", default=None, choices=("sinkrec", "gdn"),
                   help="run the ablations for these archs (default sinkrec; gdn: e.g. GDN with one loop)")
    p.add_argument("--heldout-users", type=int, default=None,
                   help="also score each run at the highest ratio on this many new SinkBench users "
                        "(sinkrec/heldout.py; ~2 min per run at 20000 on one thread); 0 = off (the default; "
                        "--quick: 300)")
    p.add_argument("--part", default=None, help="i/n: train every n-th run from the i-th; no report")
    p.add_argument("--jobs", type=int, default=1,
                   help="train in this many processes at once (each a --part, with cpu_count / jobs torch "
                        "threads), then write the report from their runs (`make study`: 2)")
    args = p.parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and args.part is not None):
        p.error(f"--jobs {args.jobs}: expected >= 1, and not together with --part (--jobs starts the parts)")
    g = QUICK if args.quick else FULL
    if args.heldout_users is None:
        args.heldout_users = 300 if args.quick else 0
    if args.heldout_users < 0:
        p.error(f"--heldout-users {args.heldout_users}: expected >= 0")
    subset: dict = {k: tuple(v) for k in ("ratios", "seeds", "archs", "ablations", "variants", "ablated")
                    if (v := getattr(args, k)) is not None}
    if args.epochs is not None:
        if args.epochs < 1:
            p.error(f"--epochs {args.epochs}: expected >= 1")
        subset["epochs"] = args.epochs
    if subset:
        if args.report is None and not args.quick:
            p.error("a part of the grid (--ratios/--seeds/--archs/--ablations/--variants/--epochs) needs --report: "
                    "docs/STUDY.md is the whole grid's report")
        g = dataclasses.replace(g, **subset)
    part = None
    if args.part is not None:
        try:
            part = tuple(int(x) for x in args.part.split("/"))
            assert len(part) == 2 and 0 <= part[0] < part[1]
        except (ValueError, AssertionError):
            p.error(f"--part {args.part!r}: expected i/n with 0 <= i < n, e.g. 0/2")
    work = args.work or Path("outputs") / ("study-quick" if args.quick else "study")
    path = args.report or (work / "STUDY.md" if args.quick else Path("docs/STUDY.md"))
    command = shlex.join(["python", "-m", "sinkrec.study", *argv])

    import mlflow

    from sinkrec.cli import ensure_experiment, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, EXPERIMENT)
    mlflow.set_experiment(EXPERIMENT)
    t0 = time.perf_counter()
    for ratio in g.ratios:
        print(f"[study] data: {prepare_data(g, ratio)}", flush=True)
    if args.jobs > 1:  # the parts train; this process then reuses their runs and writes the report
        failed = train_parts(argv, args.jobs, path)
        if failed:
            print(f"[study] parts {failed} did not finish every run; this process retrains what is missing",
                  flush=True)
        args.resume = True
    runs = grid_runs(g)
    if part is not None:
        runs = runs[part[0]::part[1]]
    rows = []
    with mlflow.start_run(run_name=f"study-{g.name}") as parent:
        mlflow.set_tags({"study.grid": json.dumps(dataclasses.asdict(g)), "study.command": command})
        for i, run in enumerate(runs):
            print(f"[study] run {i + 1}/{len(runs)}: {run.tag} ({(time.perf_counter() - t0) / 60:.1f} min so far)",
                  flush=True)
            rows.append(train_and_analyse(g, run, parent.info.run_id, uri, work, args.resume))
        if part is not None:
            print(f"[study] part {args.part}: {len(rows)} runs done; run the same command without --part and "
                  "with --resume for the report", flush=True)
            return 0 if all(r.get("summary") for r in rows) else 1
        best_epochs(rows, uri)
        text = report(g, rows, work, path, command, parent.info.run_id, uri, time.perf_counter() - t0,
                      args.heldout_users)
    print(text)
    print(f"[study] wrote {path}")
    return 0 if all(r.get("summary") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
