"""The statistics the benches headline: mean ± standard error over seeds, the last checkpoint within the budget, the
synchronous check of bench/rl.py and bench/offpolicy.py's noise verdicts (pure functions; no job is launched)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import learn, offpolicy, rl  # noqa: E402


def test_mean_and_standard_error_match_numpy() -> None:
    values = [0.465, 0.470, 0.355]
    mean, se = learn.mean_se(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert learn.pm(values) == f"{np.mean(values) * 100:.1f} ± {se * 100:.1f}"
    assert math.isnan(learn.mean_se([0.5])[1]) and learn.pm([0.5]) == "50.0"
    assert learn.pm([-1.0, -3.0], 1, "+.1f") == "-2.0 ± 1.0"  # the sign on the mean only


@pytest.mark.parametrize("text", ["1,1", "a", "", "-1,2"])
def test_bad_seeds_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="--seeds"):
        learn.parse_seeds(text)


def test_final_checkpoint_is_the_last_step_within_the_budget(tmp_path: Path) -> None:
    for step in (1, 2, 3, 5):
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step, "time": float(step)}))
    (tmp_path / "checkpoints" / "step_000004").mkdir()  # incomplete: no state.json
    assert learn.final_checkpoint(tmp_path, 4)[0] == 3  # step 5 finished after the deadline
    assert learn.final_checkpoint(tmp_path, 9)[0] == 5
    assert learn.final_checkpoint(tmp_path, 0) is None


def test_a_stale_step_makes_a_sync_row_not_synchronous() -> None:
    metrics = [{"step": i, "time": float(i), "reward_mean": 0.5, "staleness": 0} for i in range(1, 5)]
    row = {"label": "sync", "depth": 0, "workers": 1, **rl.summarize(metrics)}
    assert any(line.endswith(": synchronous") for line in rl.verdicts([row], None))
    metrics[2]["staleness"] = 1
    row = {"label": "sync", "depth": 0, "workers": 1, **rl.summarize(metrics)}
    assert any("NOT synchronous" in line for line in rl.verdicts([row], None))


def test_offpolicy_verdicts_compare_within_two_standard_errors() -> None:
    sync = offpolicy.Setting("quickstart", 0, True, finals=[0.90, 0.92, 0.94], walls=[20.0] * 3)
    on = offpolicy.Setting("quickstart", 2, True, finals=[0.91, 0.93, 0.92], walls=[15.0] * 3)
    off = offpolicy.Setting("quickstart", 2, False, finals=[0.60, 0.62, 0.64], walls=[15.0] * 3)
    lines = offpolicy.verdicts([sync, on, off])
    assert any("depth 2 with the correction vs synchronous" in x and "within noise" in x for x in lines)
    assert any("wall time 0.75 of synchronous" in x for x in lines)
    assert any("depth 2 without the correction vs with: final -0.300" in x and "worse beyond" in x for x in lines)
    table = offpolicy.table([sync, on, off], [1, 2, 3])
    assert "| quickstart | 2 | off (tis_cap 0) | 3/3 | - | 0.620 ± 0.012 | -0.300 ± 0.016 |" in table
