"""`vlm-judge eval BENCH --judge A --judge B ...`: meta-evaluate judges and write a report folder."""

from __future__ import annotations

import argparse
import sys

from eval.benchmarks import FORMATS
from eval.probes import PROBES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm-judge eval",
        description="Score a benchmark with each judge and write a report (Markdown, HTML, PNG plots, JSON).",
    )
    p.add_argument("bench", help="benchmark file (.jsonl, .json or .csv)")
    p.add_argument("--judge", action="append", required=True, metavar="[text:|vision:]NAME[@BACKEND]",
                   help="a judge name or folder; repeat for several. 'text:' gives it captions instead of images; "
                        "'@hf' / '@openai' / '@mock' picks its backend")
    p.add_argument("--backend", help="backend for judges without '@BACKEND' (hf, openai, vllm, mock); default from the judge card")
    p.add_argument("--base-url", help="OpenAI-compatible server URL for judges on the openai backend")
    p.add_argument("--format", choices=FORMATS, help="benchmark format (default: guessed from the first row)")
    p.add_argument("--column-map", help="FIELD=COLUMN,... e.g. gold=my_rating,image=img_path")
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
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-parse-retries", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, help="generation budget per judgment (default: the scorer's)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for intervals and paired tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_report", help="report folder (re-runs resume from its cache)")
    return p


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if "=" not in v:
            raise ValueError(f"{flag} {v!r}: expected KEY=VALUE")
        k, val = v.split("=", 1)
        out.append((k, val))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eval.pipeline import EvalConfig, run_eval
    from eval.report import write_report
    from vlm_judge.jsonl import Locked

    try:
        lo, hi = (float(x) for x in args.gold_scale.split(","))
        probes = list(PROBES) if args.probes.strip() == "all" else [p.strip() for p in args.probes.split(",") if p.strip()]
        self_models: dict[str, list[str]] = {}
        for k, v in _pairs(args.self_model, "--self-model"):
            self_models.setdefault(k, []).append(v)
        cfg = EvalConfig(
            bench=args.bench, judges=args.judge, out=args.out, backend=args.backend, format=args.format,
            column_map=args.column_map, rubric=args.rubric, image_root=args.image_root,
            image_rewrites=dict(_pairs(args.image_rewrite, "--image-rewrite")), gold_scale=(lo, hi),
            limit=args.limit, probes=probes, caption_model=args.caption_model, caption_backend=args.caption_backend,
            base_url=args.base_url,
            self_models=self_models, expected_score=args.expected_score, batch_size=args.batch_size,
            max_parse_retries=args.max_parse_retries, max_new_tokens=args.max_new_tokens, n_boot=args.n_boot, seed=args.seed,
        )
        res = run_eval(cfg)
    except (ValueError, FileNotFoundError, ImportError, Locked) as e:
        print(f"vlm-judge eval: {e}", file=sys.stderr)
        return 2
    path = write_report(res, args.out)
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for label, m in res["metrics"].items():
        print(f"{label}: scored {m['scored']}/{m['n']} (unreadable {m['parse_failure_rate']:.1%})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
