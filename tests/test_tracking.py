"""`--track` mirrors the TensorBoard scalars to wandb; offline mode needs no account or network."""

import glob

from conftest import run_script


def test_track_writes_an_offline_wandb_run_with_the_logged_keys(tmp_cwd):
    proc = run_script(
        "dqn_atari_injection",
        "--env-id",
        "CartPole-v1",
        "--total-timesteps",
        600,
        "--learning-starts",
        200,
        "--buffer-size",
        1000,
        "--inject-at",
        400,
        "--eval-every",
        0,
        "--eval-episodes",
        1,
        "--no-cuda",
        "--track",
        "--wandb-project-name",
        "test-project",
        cwd=tmp_cwd,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = glob.glob(str(tmp_cwd / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, proc.stderr[-2000:]
    data = open(runs[0], "rb").read()
    # the synced TensorBoard scalars, including the injection keys, are in the wandb run file
    for key in (b"injection/count", b"injection/output_change", b"charts/episodic_return", b"losses/td_loss"):
        assert key in data, key
    assert b"test-project" in data
