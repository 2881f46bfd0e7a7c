"""Where an ACDC run stands and where its time went, read from its sweep states (no model loaded).

For each sweep (a ``tau-*`` folder of a ``hap discover --method acdc`` run directory): edges decided,
kept, untested, forwards and seconds (over every sitting that resumed it); per layer, the readers
finished, their edges, how many were tested, the seconds they took and the seconds per tested edge; and
the time left at the measured seconds per unit of work (a test of an edge into a reader of block b
computes the blocks from b on), as if every remaining edge were tested: an upper bound, since readers
that feed nothing are decided without a forward.

    .venv/bin/python benchmarks/acdc_progress.py benchmarks/converged/ioi/acdc
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from hap.acdc import STATE_FILE


def _layer_key(reader: str) -> str:
    match = re.match(r"[am](\d+)", reader)
    return f"{int(match.group(1)):02d}" if match else "logits"


def report(folder: Path) -> None:
    """Print one sweep's standing, its per-layer table and the time left."""
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    readers = saved.get("readers", [])
    print(f"\n## {folder.name}: tau {saved['config']['threshold']:g}\n")
    print(f"decided {int(saved['position']):,} edges (untested {int(saved.get('untested', 0)):,}, replayed "
          f"{int(saved.get('replayed', 0)):,}), kept so far {int(saved['kept'].sum()):,} counting every undecided "
          f"edge, {int(saved['forwards']):,} forwards, {float(saved.get('seconds', 0.0)) / 3600:.2f} h on the "
          "sweep's clock")
    if len(readers) < 2:
        print("(no per-reader log yet, or the sweep was started by an older hap)")
        return
    layers: dict[str, dict[str, float]] = {}
    work_seconds, work_units = 0.0, 0
    for before, entry in zip(readers, readers[1:]):  # the first entry's time includes what ran before it
        row = layers.setdefault(_layer_key(entry["reader"]),
                                {"readers": 0, "edges": 0, "tested": 0, "kept": 0, "seconds": 0.0})
        edges, seconds = entry["position"] - before["position"], entry["seconds"] - before["seconds"]
        row["readers"] += 1
        row["edges"] += edges
        row["kept"] += entry["kept"]
        row["seconds"] += seconds
        if entry["tested"]:
            row["tested"] += edges
            work_seconds += seconds
            work_units += entry["work"] - before["work"]
    print("\n| layer | readers | edges | tested | kept | seconds | s per tested edge |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key in sorted(layers, key=lambda k: -1 if k == "logits" else -int(k)):
        row = layers[key]
        per = f"{row['seconds'] / row['tested']:.3f}" if row["tested"] else ""
        print(f"| {key} | {row['readers']} | {row['edges']:,} | {row['tested']:,} | {row['kept']} | "
              f"{row['seconds']:,.0f} | {per} |")
    if work_units:
        rate = work_seconds / work_units
        left = readers[-1]["work_left"]
        print(f"\n{rate * 1e3:.1f} ms per unit of work (tested edge x blocks computed); {left:,} units left: "
              f"at most {left * rate / 3600:.1f} h more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an acdc run directory (or one of its tau-* folders)")
    args = parser.parse_args()
    folders = [args.run] if (args.run / STATE_FILE).is_file() else sorted(args.run.glob("tau-*"))
    if not folders:
        raise SystemExit(f"{args.run}: no {STATE_FILE} in it or in its tau-* folders")
    for folder in folders:
        report(folder)


if __name__ == "__main__":
    main()
