"""``main.py``, except that the process of rank 1 fails with a bad input only it sees (``RANK_FAULT=abort``: it
dies by SIGABRT there, as an abort inside C++ code would kill it): what is the user told? Launched by
tests/test_distributed.py in main.py's place."""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if os.environ.get("RANK") == "1":
    import dataset

    def _bad_input(*args, **kwargs):
        if os.environ.get("RANK_FAULT") == "abort":
            os.abort()
        raise ValueError("a bad input that only rank 1 sees")

    dataset.prepare = _bad_input  # after the models are loaded, before any training

sys.argv = [str(ROOT / "main.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
