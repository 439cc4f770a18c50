"""Make a processed dataset ready before training reads it: what `make preprocess` does, by root.

    prepare("data/processed/ml-1m")   # fetch data/raw/ml-1m if missing, then the pipeline (idempotent)

A root is *shipped* when `conf/pipeline/<root's name>.yaml` writes it (its `out`): then the raw data
is fetched or generated (pipeline.datasets) and the pipeline run, which does nothing when the output
is up to date and rebuilds it when the pipeline code changed. Any other root (a test's, a study's, a
benchmark's, a directory copied from elsewhere) was made by whoever made it and is left as it is.

Every training process may call this at once (Lightning runs `prepare_data` on local rank 0 of each
node; the CLI may call it on every rank before the data module exists): the first takes the
output's lock and builds, the others wait for it and then find the output up to date.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import datasets
from pipeline.config import PipelineConfig, load_file
from pipeline.errors import PipelineError
from pipeline.run import Log, log_stdout, run

CONF = Path("conf/pipeline")


def shipped_config(root: str | Path, conf: Path = CONF) -> PipelineConfig | None:
    """The pipeline config in `conf` whose output is `root`, or None."""
    path = conf / f"{Path(root).name}.yaml"
    if not path.is_file():
        return None
    cfg = load_file(path)
    return cfg if Path(cfg.out).resolve() == Path(root).resolve() else None


def prepare(root: str | Path, log: Log = log_stdout, conf: Path = CONF) -> Path:
    """Bring a shipped root up to date (fetching its raw data first); any other root: nothing to do."""
    cfg = shipped_config(root, conf)
    if cfg is None:
        return Path(root)

    def fetch() -> None:  # under the output's lock: two ranks never download into the same file
        if cfg.name in datasets.known():
            try:
                datasets.ensure(cfg.name)
            except datasets.FetchError as e:
                raise PipelineError(f"{e} (raw data of {root}; `make data` fetches it)") from None

    return run(cfg, log, wait=True, before=fetch)
