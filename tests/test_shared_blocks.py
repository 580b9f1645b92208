"""The shared blocks are textually identical in every script, and the sync tool keeps them so."""

import importlib.util
from pathlib import Path

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
