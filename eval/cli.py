"""`vlm-judge eval BENCH --judge A --judge B ...`: meta-evaluate judges and write a report folder.

Two served judges on two servers: `--judge a@openai --judge b@openai --base-url a=URL1 --base-url b=URL2`
(a plain `--base-url URL` is shared by every judge; see `vlm_judge.judge_options`).

Exit status: 0 when every item was judged (parse failures are judgments too), 3 when some items
errored for some judge (e.g. a server down; the report shows them), 2 for a bad command line or
configuration.
"""

from __future__ import annotations

import argparse
import sys

from eval.benchmarks import FORMATS
from eval.probes import PROBES
from vlm_judge.judge_options import add_judge_options, judge_parser
from vlm_judge.options import ConfigError, output_problem, parse_pairs

EXIT_OK, EXIT_CONFIG, EXIT_ITEM_ERRORS = 0, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = judge_parser("vlm-judge eval", "Score a benchmark with each judge and write a report "
                                       "(Markdown, HTML, PNG plots, JSON).")
    p.add_argument("bench", help="benchmark file (.jsonl, .json or .csv)")
    p.add_argument("--judge", action="append", required=True, metavar="[text:|vision:]NAME[@BACKEND]",
                   help="a judge name or folder; repeat for several. 'text:' gives it captions instead of images; "
                        "'@hf' / '@openai' / '@mock' picks its backend")
    add_judge_options(p)
    p.add_argument("--format", choices=FORMATS, help="benchmark format (default: guessed from the first row)")
    p.add_argument("--column-map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="read FIELD from the file's COLUMN, e.g. gold=my_rating,image=img_path (repeat, or comma-separate)")
    p.add_argument("--rubric", help="rubric file for benchmarks without one ('Score N:' text or JSON)")
    p.add_argument("--image-root", help="folder that relative image paths are resolved against")
    p.add_argument("--image-rewrite", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite an image path prefix, e.g. ../train2017/=/data/coco/train2017/")
    p.add_argument("--gold-scale", default="1,5", help="LOW,HIGH of the gold scores, mapped onto 1..5 (e.g. 1,10)")
    p.add_argument("--limit", type=int, help="read only the first N rows")
    p.add_argument("--probes", default="", help=f"comma list of {','.join(PROBES)} or 'all'")
    p.add_argument("--caption-model", help="caption images with this model for text judges")
    p.add_argument("--caption-backend", default="hf", help="backend of the captioning model")
    p.add_argument("--self-model", action="append", default=[], metavar="JUDGE=MODEL",
                   help="the judge also wrote MODEL's responses (self-preference probe)")
    p.add_argument("--expected-score", action="store_true",
                   help="also the expected score from the judge's probabilities over 1..5 (backends with next_token_probs)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per backend call")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for intervals and paired tests")
    p.add_argument("--out", default="eval_report", help="report folder (re-runs resume from its cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eval.pipeline import EvalConfig, run_eval
    from eval.report import write_report
    from vlm_judge.jsonl import Locked

    try:
        problem = output_problem(args.out, folder=True, name="--out")
        if problem:
            raise ConfigError(problem)
        lo, hi = (float(x) for x in args.gold_scale.split(","))
        probes = list(PROBES) if args.probes.strip() == "all" else [p.strip() for p in args.probes.split(",") if p.strip()]
        self_models: dict[str, list[str]] = {}
        for item in args.self_model:  # one judge may have written several models' responses
            for k, v in parse_pairs([item], "--self-model").items():
                self_models.setdefault(k, []).append(v)
        cfg = EvalConfig(
            bench=args.bench, judges=args.judge, out=args.out, backend=args.backend, format=args.format,
            column_map=parse_pairs(args.column_map, "--column-map", split_commas=True) or None, rubric=args.rubric, image_root=args.image_root,
            image_rewrites=parse_pairs(args.image_rewrite, "--image-rewrite"), gold_scale=(lo, hi),
            limit=args.limit, probes=probes, caption_model=args.caption_model, caption_backend=args.caption_backend,
            base_urls=args.base_url, backend_args=parse_pairs(args.backend_arg, "--backend-arg", json_values=True),
            template=args.template, self_models=self_models, expected_score=args.expected_score,
            batch_size=args.batch_size, max_parse_retries=args.retries, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, n_boot=args.n_boot, seed=args.seed,
        )
        res = run_eval(cfg, progress=not args.no_progress)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, Locked) as e:
        print(f"vlm-judge eval: {e}", file=sys.stderr)
        return EXIT_CONFIG
    path = write_report(res, args.out)
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    errored = 0
    for label, m in res["metrics"].items():
        errors = sum(j.status == "error" for j in res["judgments"][label])
        errored += errors
        print(f"{label}: scored {m['scored']}/{m['n']} (unreadable {m['parse_failure_rate']:.1%}"
              + (f", errors {errors}" if errors else "") + ")")
    print(f"report: {path}")
    if errored:
        print(f"vlm-judge eval: {errored} judgments errored; their reasons are in {args.out}/judgments.jsonl",
              file=sys.stderr)
        return EXIT_ITEM_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
