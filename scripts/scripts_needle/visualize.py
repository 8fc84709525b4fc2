"""Heatmaps of needle-in-a-haystack results: one panel per run (method, budget) in one PNG.

    python scripts/scripts_needle/visualize.py --results_dir results_needle --out results_needle/img/needle.png
"""

import argparse
import logging
from pathlib import Path

from ntkkv import viz
from ntkkv.eval import needle


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", required=True,
                        help="a --save_dir of run_needle_in_haystack.py, or one run's folder inside it")
    parser.add_argument("--out", default=None, help="PNG to write; default <results_dir>/img/needle_<metric>.png")
    parser.add_argument("--metric", default="score", choices=sorted(viz.METRIC_RANGES),
                        help="score: ROUGE-1 x 10 as the seed; key_facts_score: share of key facts found")
    parser.add_argument("--runs", nargs="*", default=None, help="only these run folders (model_version names)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    runs = needle.load_results_by_run(args.results_dir)
    if args.runs:
        missing = sorted(set(args.runs) - set(runs))
        if missing:
            parser.error(f"no results for {missing} under {args.results_dir}; found: {', '.join(runs) or 'none'}")
        runs = {name: runs[name] for name in args.runs}
    if not runs:
        parser.error(f"no *_results.json files under {args.results_dir}")
    panels = {viz.panel_label(records): records for records in runs.values()}
    for label, records in panels.items():
        logging.info("%-20s %3d cells  mean %s %.2f", label, len(records), args.metric,
                     needle.mean_score(records, args.metric))
    out = args.out or Path(args.results_dir) / "img" / f"needle_{args.metric}.png"
    viz.plot_needle_heatmaps(panels, out, metric=args.metric, title=args.title)


if __name__ == "__main__":
    main()
