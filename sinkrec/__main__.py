"""`python -m sinkrec {fit,validate,test,predict} --config conf/train/<name>.yaml` (see sinkrec/cli.py)."""

import sys

from sinkrec.cli import run

if __name__ == "__main__":
    sys.exit(run())
