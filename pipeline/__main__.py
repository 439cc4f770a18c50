"""`python -m pipeline --config conf/pipeline/<name>.yaml [--any-config-key VALUE ...]`"""

from __future__ import annotations

import argparse
import signal
import sys

from pipeline.config import add_config_flags, load
from pipeline.errors import PipelineError
from pipeline.run import run


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. a cancelled job) unwinds like Ctrl-C, so the hidden build directory is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Raw interaction logs -> time-ordered per-user sequences in sharded Parquet "
                    "(docs/data_format.md). Every config key is a flag; flags override the YAML.")
    parser.add_argument("--config", help="YAML file in conf/pipeline/ (default: dataclass defaults only)")
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(load(config_path, args))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
