"""manifest.json: what was read, how, what came out at every step, and the files with their hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.contract import FORMAT_VERSION, MANIFEST, sha256_of


def describe_sources(files: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_of(f)} for f in files]


def code_fingerprint() -> str:
    """sha256 over the pipeline's source files: a changed pipeline rebuilds an otherwise up-to-date output."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def split_protocol(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.split == "time_cutoff":
        return {"protocol": "time_cutoff", "valid_ts": cfg.valid_ts, "test_ts": cfg.test_ts}
    return {"protocol": "leave_one_out"}


def build(cfg: PipelineConfig, sources: list[dict], steps: list[dict], shards: list[dict],
          num_items: int, extra: dict[str, Any]) -> dict[str, Any]:
    last = steps[-1]
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "sources": sources,
        "config": cfg.identity() | {"out": cfg.out},
        "steps": steps,
        "counts": {k: last[k] for k in ("events", "users", "items")},
        "num_items": num_items,
        "side_columns": list(cfg.event_features),
        "shards": shards,
        "split": split_protocol(cfg),
        "code_sha256": code_fingerprint(),
        **extra,
    }


def write(manifest: dict[str, Any], out: Path) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def differences(manifest: dict[str, Any], cfg: PipelineConfig, sources: list[dict]) -> list[str]:
    """What differs between an existing output and this run (empty: the output is up to date)."""
    diffs = []
    old_config = {k: v for k, v in manifest.get("config", {}).items() if k != "out"}
    for key in sorted(set(old_config) | set(cfg.identity())):
        if old_config.get(key) != cfg.identity().get(key):
            diffs.append(f"config {key}: {old_config.get(key)!r} -> {cfg.identity().get(key)!r}")
    if [(s["path"], s["sha256"]) for s in manifest.get("sources", [])] != [(s["path"], s["sha256"]) for s in sources]:
        diffs.append("input files or their contents")
    if manifest.get("format_version") != FORMAT_VERSION:
        diffs.append(f"format_version {manifest.get('format_version')} -> {FORMAT_VERSION}")
    return diffs


def files_intact(manifest: dict[str, Any], out: Path) -> bool:
    """Every shard listed is there with its recorded sha256, and so are the vocab tables."""
    if not all((out / name).is_file() for name in ("items.parquet", "users.parquet")):
        return False
    return all((out / s["path"]).is_file() and sha256_of(out / s["path"]) == s["sha256"]
               for s in manifest.get("shards", []))
