"""Score LongBench predictions as LongBench does: metrics.json beside each prediction file,
results.csv (methods × datasets, with the average) in the results folder, and the table printed.
With --baseline METHOD, also each method against that one, sample by sample: the mean score
difference and its 95% bootstrap interval (paired_vs_METHOD.csv), to tell a gain from noise.
With --ruler, run_ruler.py's predictions as RULER scores them (string match), by method and length.

    python eval.py --results_dir results_longbench/smollm2_128 --baseline SnapKV
    python eval.py --results_dir results_ruler/smollm2_128 --ruler
"""
import argparse
import logging
import os
import sys

from ntkkv.eval.jsonl import BAD_LINE_POLICIES, BadLineError
from ntkkv.eval.scoring import compare_to_baseline, format_table, score_results, table_rows, write_csv


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", required=True,
                        help="a {model}_{budget} folder, or a folder of them (e.g. run_longbench.py's --save_dir)")
    parser.add_argument("--longbench_e", action="store_true",
                        help="score the LongBench-E ({dataset}_e) folders by length")
    parser.add_argument("--fuzzy_matcher", default="levenshtein", choices=["levenshtein", "difflib"],
                        help="code similarity as fuzzywuzzy computes it with (levenshtein) or without "
                             "python-Levenshtein")
    parser.add_argument("--on_bad_line", default="stop", choices=BAD_LINE_POLICIES)
    parser.add_argument("--baseline", help="a method name (its file name, e.g. SnapKV): compare every method "
                                           "with it on the samples both hold")
    parser.add_argument("--ruler", action="store_true",
                        help="score run_ruler.py's {length}/{task} folders (RULER's string match) instead")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.ruler:
            from ntkkv.eval import ruler  # only here: it loads torch, which LongBench's scoring does not need

            table = ruler.score_results(args.results_dir, args.on_bad_line)
        else:
            table = score_results(args.results_dir, args.longbench_e, args.fuzzy_matcher, args.on_bad_line)
    except (OSError, BadLineError) as error:
        sys.exit(f"eval.py: error: {error}")
    if not table:
        layout = ".../{dataset}_e/{method}.json" if args.longbench_e else ".../{dataset}/{method}.json"
        layout = ".../{length}/{task}/{method}.json" if args.ruler else layout
        sys.exit(f"eval.py: error: no prediction files under {args.results_dir!r} (expected {layout})")
    if args.ruler:
        from ntkkv.eval import ruler

        header, rows = ruler.table_rows(table)
    else:
        header, rows = table_rows(table, args.longbench_e)
    csv_path = os.path.join(args.results_dir, "results.csv")
    write_csv(csv_path, header, rows)
    print(format_table(header, rows))
    print(f"\nwrote {csv_path} and metrics.json in each {'task' if args.ruler else 'dataset'} folder")
    if args.baseline:
        if args.longbench_e:
            sys.exit("eval.py: error: --baseline compares whole datasets; leave out --longbench_e")
        if args.ruler:
            sys.exit("eval.py: error: --baseline compares LongBench datasets; leave out --ruler")
        try:
            paired = compare_to_baseline(args.results_dir, args.baseline, args.fuzzy_matcher, args.on_bad_line)
        except (ValueError, BadLineError) as error:
            sys.exit(f"eval.py: error: {error}")
        header = ["method", "dataset", "samples", f"vs {args.baseline}", "95% low", "95% high"]
        paired_path = os.path.join(args.results_dir, f"paired_vs_{args.baseline}.csv")
        write_csv(paired_path, header, paired)
        print(f"\nagainst {args.baseline}, sample by sample (score difference, 95% bootstrap interval):")
        print(format_table(header, paired))
        print(f"\nwrote {paired_path}")


if __name__ == "__main__":
    main()
