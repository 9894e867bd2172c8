"""MetaCLIP-style metadata for the shapes world, committed as ``demo/assets/shapes_metadata.json``.

    python -m demo.metadata [OUT.json]     # default: demo/assets/shapes_metadata.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo import world
from stages.metadata import save, unique_entries

SHAPES_METADATA = Path(__file__).resolve().parent / "assets" / "shapes_metadata.json"


def shapes_metadata() -> list[str]:
    """Metadata for the shapes world: colours, shapes, every colour+shape combination ("red
    circle"), background colours, size words and the generic nouns of the caption templates
    ("photo", "background", ...). Function words ("a", "of") are left out so that the demo's
    balancing acts on the concepts."""
    colours = list(world.COLOURS)
    shapes = list(world.SHAPES)
    combos = [f"{c} {s}" for c in colours for s in shapes]
    backgrounds = list(world.BACKGROUNDS)
    generic = ["small", "large", "photo", "image", "drawing", "picture", "background", "plain"]
    return unique_entries([colours, shapes, combos, backgrounds, generic])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.metadata", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(SHAPES_METADATA))
    args = ap.parse_args(argv)
    entries = shapes_metadata()
    print(f"{save(entries, args.out)}: {len(entries)} entries")


if __name__ == "__main__":
    main()
