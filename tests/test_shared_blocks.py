"""The shared blocks are textually identical in every script, and the sync tool keeps them so."""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sync_blocks", ROOT / "tools" / "sync_blocks.py")
sync_blocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_blocks)


def test_every_script_carries_every_block_identically():
    assert sync_blocks.block_names(), "no canonical blocks found"
    assert sync_blocks.problems() == []


def test_check_detects_an_edited_copy(tmp_path):
    text = (ROOT / "dqn_atari_injection.py").read_text()
    bodies = sync_blocks.blocks_in(text)
    assert set(bodies) == set(sync_blocks.block_names())
    name = sync_blocks.block_names()[0]
    edited = text.replace(bodies[name], bodies[name] + "x = 1\n", 1)
    assert sync_blocks.blocks_in(edited)[name] != sync_blocks.canonical(name)
    # replace_blocks restores the canonical text
    restored = sync_blocks.replace_blocks(edited, {name: sync_blocks.canonical(name)})
    assert restored == text


def test_the_injection_block_and_each_train_stay_within_their_line_budgets():
    """What people copy (the injection block) at most 130 lines; each train() at most 150, read in five minutes."""
    assert len(sync_blocks.canonical("injection").splitlines()) <= 130
    for script in sync_blocks.SCRIPTS:
        tree = ast.parse((ROOT / script).read_text())
        (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
        assert train.end_lineno - train.lineno + 1 <= 150, script


def own_part(script: str) -> int:
    """Lines of a script outside its shared blocks (the marker lines count as the blocks')."""
    inside, count = False, 0
    for line in (ROOT / script).read_text().splitlines():
        inside = inside or "==== BEGIN SHARED BLOCK" in line
        count += not inside
        inside = inside and "==== END SHARED BLOCK" not in line
    return count


@pytest.mark.parametrize(
    "script",
    [
        "ppo_atari_injection.py",
        "iql_pointmass_injection.py",
        pytest.param(
            "dqn_atari_injection.py",
            marks=pytest.mark.xfail(strict=True, reason="over the 650 budget (issue 20: see its closing note)"),
        ),
    ],
)
def test_each_script_own_part_stays_within_650_lines(script):
    assert own_part(script) <= 650
