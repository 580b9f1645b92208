#!/usr/bin/env python
"""Keep the shared code blocks textually identical in every experiment script.

The canonical text of each block lives in shared_blocks/<name>.py. Each script at the repository
root carries a copy between the marker lines

    # ==== BEGIN SHARED BLOCK: <name> (shared_blocks/<name>.py; sync: tools/sync_blocks.py) ====
    # ==== END SHARED BLOCK: <name> ====

Usage:
    python tools/sync_blocks.py                 # copy shared_blocks/*.py into every script
    python tools/sync_blocks.py --from dqn_atari_injection.py
                                                # you edited a block inside that script: make its
                                                # version canonical, then copy it everywhere
    python tools/sync_blocks.py --check         # exit 1 and list every copy that differs
    python tools/sync_blocks.py --only dqn_atari_injection.py
                                                # copy the canonical blocks into that script only
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_DIR = ROOT / "shared_blocks"
SCRIPTS = ["dqn_atari_injection.py", "ppo_atari_injection.py", "iql_pointmass_injection.py"]
BEGIN = "# ==== BEGIN SHARED BLOCK: {name} (shared_blocks/{name}.py; sync: tools/sync_blocks.py) ===="
END = "# ==== END SHARED BLOCK: {name} ===="
_PATTERN = re.compile(
    r"^# ==== BEGIN SHARED BLOCK: (?P<name>[\w-]+) .*?====\n(?P<body>.*?)^# ==== END SHARED BLOCK: (?P=name) ====$",
    re.S | re.M,
)


def block_names():
    return sorted(p.stem for p in BLOCK_DIR.glob("*.py"))


def canonical(name: str) -> str:
    return (BLOCK_DIR / f"{name}.py").read_text()


def blocks_in(text: str) -> dict:
    """name -> body of every shared block found in a script's text."""
    return {m.group("name"): m.group("body") for m in _PATTERN.finditer(text)}


def render(name: str, body: str) -> str:
    # Two blank lines before the END marker: what `ruff format` leaves after a top-level def or class.
    return BEGIN.format(name=name) + "\n" + body.rstrip("\n") + "\n\n\n" + END.format(name=name)


def replace_blocks(text: str, bodies: dict) -> str:
    def sub(m):
        name = m.group("name")
        return render(name, bodies[name]) if name in bodies else m.group(0)

    return _PATTERN.sub(sub, text)


def problems(scripts=None) -> list:
    """Every difference between a script's copy of a block and the canonical text."""
    out = []
    for script in scripts or SCRIPTS:
        path = ROOT / script
        if not path.exists():
            out.append(f"{script}: missing")
            continue
        found = blocks_in(path.read_text())
        for name in block_names():
            if name not in found:
                out.append(f"{script}: block '{name}' missing")
            elif found[name].rstrip("\n") != canonical(name).rstrip("\n"):
                out.append(f"{script}: block '{name}' differs from shared_blocks/{name}.py")
        for name in set(found) - set(block_names()):
            out.append(f"{script}: block '{name}' has no canonical file shared_blocks/{name}.py")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    ap.add_argument("--from", dest="source", help="script whose blocks become canonical before syncing")
    ap.add_argument("--only", help="write the blocks into this script only")
    args = ap.parse_args(argv)
    if args.check:
        found = problems([s for s in SCRIPTS if (ROOT / s).exists()])
        print("\n".join(found) if found else "shared blocks are identical in every script")
        return 1 if found else 0
    if args.source:
        src = Path(args.source)
        src = src if src.is_absolute() else ROOT / src
        if not src.exists():
            print(f"error: --from {args.source}: no such script", file=sys.stderr)
            return 2
        for name, body in blocks_in(src.read_text()).items():
            (BLOCK_DIR / f"{name}.py").write_text(body)
            print(f"shared_blocks/{name}.py <- {src.name}")
    bodies = {n: canonical(n) for n in block_names()}
    for script in [Path(args.only).name] if args.only else SCRIPTS:
        path = ROOT / script
        if not path.exists():
            continue
        old = path.read_text()
        new = replace_blocks(old, bodies)
        if new != old:
            path.write_text(new)
            print(f"updated {script}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
