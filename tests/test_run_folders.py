"""Two runs started at once with the same name and seed end in two folders, each with its own logs and model."""

import subprocess
import sys

import pytest
from conftest import ROOT

TINY = {
    "iql_pointmass_injection": "--hidden-sizes 8 --batch-size 16 --dataset-kind random --dataset-steps 100 "
    "--offline-steps 20 --online-steps 0 --eval-every 20 --eval-episodes 1 --metrics-every 0",
    "dqn_atari_injection": "--env-id CartPole-v1 --total-timesteps 300 --learning-starts 100 --buffer-size 300 "
    "--eval-episodes 0 --metrics-every 0",
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_simultaneous_runs_of_one_name_and_seed_get_their_own_folders(tmp_cwd, script):
    (tmp_cwd / "datasets").mkdir()  # IQL: generate the shared cache first, so both runs only read it
    if script.startswith("iql"):
        subprocess.run(
            [sys.executable, str(ROOT / f"{script}.py"), *TINY[script].split(), "--no-cuda", "--exp-name", "warm"],
            cwd=tmp_cwd,
            check=True,
            capture_output=True,
        )
    flags = [*TINY[script].split(), "--no-cuda", "--save-model", "--exp-name", "same", "--seed", "7"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *flags], cwd=tmp_cwd) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    folders = sorted((tmp_cwd / "runs").glob("*__same__7__*"))
    assert len(folders) == 3
    for folder in folders:
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, folder
        assert len(list(folder.glob("*.cleanrl_model"))) == 1, folder


@pytest.mark.parametrize("script", sorted(TINY))
def test_an_unusable_output_folder_is_one_line_before_training(tmp_cwd, script):
    (tmp_cwd / "runs").write_text("a file where the runs folder should be")
    proc = subprocess.run(
        [sys.executable, str(ROOT / f"{script}.py"), *TINY[script].split(), "--no-cuda"],
        cwd=tmp_cwd,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot create the run folder runs/")
    assert "global_step=" not in proc.stdout  # no training step ran
