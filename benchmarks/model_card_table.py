"""Print a model card's results table (markdown) from `forcecalc eval` JSON files.

    python benchmarks/model_card_table.py NAME
reads benchmarks/results/eval_s2ef_NAME.json and eval_is2rs_NAME.json (written by
benchmarks/train_weights.sh); baselines in parentheses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="the model card's name, e.g. spinconv-fc")
    name = parser.parse_args().name
    s2ef = json.loads((RESULTS / f"eval_s2ef_{name}.json").read_text())
    is2rs = json.loads((RESULTS / f"eval_is2rs_{name}.json").read_text())
    print(
        "| split | energy MAE (eV) | force MAE (eV/Å) | force cos | EFwT | ADwT | AFbT "
        "| IS2RE MAE (eV) | EwT | relaxations converged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for split, row in s2ef.items():
        m, b, r = row["model"], row["median"], is2rs[split]
        rs, r0, re, rb = r["is2rs"], r["baseline_initial_structure"], r["is2re"], r["median_is2re"]
        print(
            f"| {split} | {m['energy_mae']:.3f} ({b['energy_mae']:.3f}) "
            f"| {m['forces_mae']:.4f} ({b['forces_mae']:.4f}) "
            f"| {m['forces_cos']:.3f} ({b['forces_cos']:.3f}) "
            f"| {100 * m['efwt']:.1f}% ({100 * b['efwt']:.1f}%) "
            f"| {100 * rs['adwt']:.1f}% ({100 * r0['adwt']:.1f}%) "
            f"| {100 * rs['afbt']:.1f}% ({100 * r0['afbt']:.1f}%) "
            f"| {re['energy_mae']:.3f} ({rb['energy_mae']:.3f}) "
            f"| {100 * re['ewt']:.1f}% ({100 * rb['ewt']:.1f}%) "
            f"| {100 * r['converged']:.0f}% of {r['systems']} |"
        )


if __name__ == "__main__":
    main()
