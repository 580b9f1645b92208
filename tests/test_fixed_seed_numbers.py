"""Same seed, same numbers: short runs of each script (with an injection and plasticity metrics) log exactly
what the scripts logged before the lean-scripts restructure (references in tests/data/, one per kind of CPU, recorded
by `python tests/fixed_seed_runs.py --write` at commit 9e55942). On a kind of CPU without its own reference the
Intel one is compared loosely: float kernels round differently (0.1% in a gradient norm after 320 Atari steps)."""

import json

import numpy as np
import pytest
from fixed_seed_runs import REFERENCE, REFERENCES, RUNS, run

REF = json.loads((REFERENCE or REFERENCES["GenuineIntel"]).read_text())
RTOL, ATOL = (1e-5, 1e-7) if REFERENCE else (1e-2, 1e-5)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_logged_numbers_match_the_reference(name):
    got, want = run(name), REF[name]
    assert sorted(got) == sorted(want), "the set of logged keys changed"
    for key in want:
        g, w = np.array(got[key]), np.array(want[key])
        assert g.shape == w.shape, key
        assert np.array_equal(g[:, 0], w[:, 0]), f"{key}: logged at other steps"
        np.testing.assert_allclose(g[:, 1], w[:, 1], rtol=RTOL, atol=ATOL, err_msg=key)  # float32 rounding
