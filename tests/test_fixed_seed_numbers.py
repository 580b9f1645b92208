"""Same seed, same numbers: short runs of each script (with an injection and plasticity metrics) log exactly
what the scripts logged before the lean-scripts restructure (reference: tests/data/fixed_seed_reference.json,
recorded by `python tests/fixed_seed_runs.py --write` at commit 9e55942)."""

import json

import numpy as np
import pytest
from fixed_seed_runs import REFERENCE, RUNS, run

REF = json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_logged_numbers_match_the_reference(name):
    got, want = run(name), REF[name]
    assert sorted(got) == sorted(want), "the set of logged keys changed"
    for key in want:
        g, w = np.array(got[key]), np.array(want[key])
        assert g.shape == w.shape, key
        assert np.array_equal(g[:, 0], w[:, 0]), f"{key}: logged at other steps"
        # Same CPU kind as where the reference was recorded: expect equality up to float32 rounding.
        np.testing.assert_allclose(g[:, 1], w[:, 1], rtol=1e-5, atol=1e-7, err_msg=key)
