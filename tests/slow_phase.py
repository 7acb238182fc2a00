"""``main.py``, except that one phase waits for a signal before doing its work, so that a test can send SIGTERM
*during* it on every process: ``SLOW_PHASE=reference`` (DPO's reference pass, before the first step) or
``SLOW_PHASE=evaluation`` (a periodic evaluation during training). Each process touches ``$SLOW_MARK.rank<k>``
when it enters the phase. ``SLOW_PHASE=rank1_save`` instead delays rank 1's part of every checkpoint by 3 s (a
process slowed by a loaded machine). Launched by tests/test_distributed.py in main.py's place."""

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.run_log import SIGNALS  # noqa: E402


def _wait_for_a_signal():
    Path(f"{os.environ['SLOW_MARK']}.rank{os.environ.get('RANK', '0')}").touch()
    deadline = time.time() + 120
    while SIGNALS.signum is None and time.time() < deadline:
        time.sleep(0.01)  # inside a training loop the signal sets the flag; elsewhere it raises here


if os.environ["SLOW_PHASE"] == "rank1_save":
    if os.environ.get("RANK") == "1":
        import accelerate.accelerator

        real_save = accelerate.accelerator.save_accelerator_state

        def _slow_save(*args, **kwargs):
            time.sleep(3)
            return real_save(*args, **kwargs)

        accelerate.accelerator.save_accelerator_state = _slow_save
elif os.environ["SLOW_PHASE"] == "reference":
    import train_dpo

    real_reference = train_dpo.reference_logps

    def _reference_logps(*args, **kwargs):
        _wait_for_a_signal()
        return real_reference(*args, **kwargs)

    train_dpo.reference_logps = _reference_logps
else:
    from training import lifecycle

    real_evaluate = lifecycle.evaluate_policy

    def _evaluate_policy(model, ctx, *args, **kwargs):
        if model is not ctx.ref_model:  # a periodic evaluation, not the reference's at step 0
            _wait_for_a_signal()
        return real_evaluate(model, ctx, *args, **kwargs)

    lifecycle.evaluate_policy = _evaluate_policy

sys.argv = [str(ROOT / "main.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
