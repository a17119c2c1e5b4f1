"""Search a VirFace stage with Ray Tune + Optuna: the same command as the installed
``virface-search`` (see ``virface/search/cli.py`` or ``--help``), runnable from a checkout.

    python tune/run_search.py --stage virface
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from virface.search.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="run_search.py"))
