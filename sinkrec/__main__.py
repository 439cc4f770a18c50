"""`python -m sinkrec {fit,validate,test,predict} --config conf/train/<name>.yaml` (see sinkrec/cli.py)."""

from sinkrec.cli import main

if __name__ == "__main__":
    main()
