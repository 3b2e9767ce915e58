"""`vlm-judge score INPUT --judge NAME_OR_PATH --out OUT.jsonl`: score every row of a file.

Rows are read one at a time (`vlm_judge.inputs`), scored in chunks, and appended to OUT as each
chunk finishes, so a killed run loses at most one chunk. OUT is a `vlm_judge.store.JudgmentStore`:
a re-run with the same OUT keeps a row's judgment only when neither the row (its text, rubric,
image bytes) nor the judge's settings changed and it is final (ok or parse_failure); rows that
errored are judged again; at the end OUT is rewritten once, one line per input row, in input
order. The full resume rules are in that module's docstring. A bad row or unreadable input line
gets a line with status "error" and the reason; the other rows are still scored. A second run on
an OUT that a run is writing to is refused at once.

Exit status: 0 when every row was judged (parse failures are judgments too), 3 when some rows
errored (their reasons are in OUT and the summary), 1 when no row could be judged, 2 for a bad
command line or configuration, or an OUT that another run is writing to.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_judge import __version__
from vlm_judge.inputs import InputOptions, RowError, count_rows, load_rubrics, read_requests
from vlm_judge.jsonl import Locked
from vlm_judge.judge_options import add_judge_options, judge_kwargs, judge_parser
from vlm_judge.options import output_problem, parse_pairs
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import Judge
from vlm_judge.store import FINAL, FINGERPRINT, Fingerprinter, JudgmentStore
from vlm_judge.summary import format_summary, summarize

EXIT_OK, EXIT_NOTHING, EXIT_CONFIG, EXIT_ROW_ERRORS = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = judge_parser("vlm-judge score", __doc__.split("\n\n")[0])
    p.add_argument("input", help="rows to score: .jsonl, .json, .csv, .parquet, .arrow or a datasets folder")
    p.add_argument("--judge", required=True, help="'mock', a judge folder, a model path/name, or a served model's name")
    p.add_argument("--out", required=True, help="output JSONL (re-runs resume from it)")
    add_judge_options(p)
    p.add_argument("--mode", choices=["auto", "absolute", "relative"], default="auto",
                   help="auto: relative for rows with response_b, absolute otherwise")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per backend call for in-process hf judges (servers and vLLM take all pending prompts)")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="rows scored and saved together; with a server several chunks are in flight, so this never caps --backend-arg concurrency")
    p.add_argument("--n-samples", type=int, default=1, help="generations per row (needs --temperature > 0)")
    p.add_argument("--aggregate", choices=["mean", "majority"], default="mean",
                   help="how --n-samples verdicts become one: rounded mean or the most frequent")
    p.add_argument("--no-swap", action="store_true", help="relative mode: judge one order only")
    p.add_argument("--image-root", help="folder relative image paths are resolved against (default: INPUT's folder)")
    p.add_argument("--image-rewrite", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite an image path prefix, e.g. ../mmmu/=/data/mmmu/")
    p.add_argument("--image-allow", action="append", default=None, metavar="DIR",
                   help="folders images may be read from (default: the image root and the rewrite targets)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="refuse larger images")
    p.add_argument("--column-map", action="append", default=[], metavar="OURS=THEIRS",
                   help="read our column OURS from the file's column THEIRS (repeat, or comma-separate)")
    p.add_argument("--rubric", help="rubric file for rows without one (JSON/YAML/text), or a {name: rubric} library")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_judge(args: argparse.Namespace) -> Judge:
    # the template and the options are checked before the model loads
    backend, kwargs, config = judge_kwargs(
        args, args.judge, batch_size=args.batch_size, n_samples=args.n_samples, aggregate=args.aggregate,
        swap=not args.no_swap)
    return Judge.load(args.judge, backend=backend, config=config, **kwargs)


def _input_options(args: argparse.Namespace) -> InputOptions:
    default_rubric, library = (None, {})
    if args.rubric:
        default_rubric, library = load_rubrics(args.rubric)
    return InputOptions(
        image_root=args.image_root, image_rewrites=parse_pairs(args.image_rewrite, "--image-rewrite"),
        allowed=args.image_allow, column_map=parse_pairs(args.column_map, "--column-map", split_commas=True),
        mode=args.mode, default_rubric=default_rubric, rubrics=library, max_pixels=args.max_pixels,
    )


def _error_line(rid: str, err: RowError | str, judge: Judge, mode: str, template: str) -> dict[str, Any]:
    reason = err.reason if isinstance(err, RowError) else err
    j = Judgment(id=rid, mode="relative" if mode == "relative" else "absolute", score=None, status="error",
                 reason=reason, attempts=0, judge=judge.name, template=template, version=__version__)
    return j.to_dict()


def _other_judge(store: JudgmentStore, judge: Judge, template: str) -> str | None:
    """Why resuming into this file would mix two judges' verdicts, or None."""
    other = {(r.get("judge"), r.get("template")) for r in store.lines() if r.get("status") in FINAL}
    other.discard((judge.name, template))
    if not other:
        return None
    judge_, template_ = sorted(other, key=str)[0]
    return (f"{store.path} holds judgments by judge {judge_!r} with template {template_!r}, not "
            f"{judge.name!r} with {template!r}; choose another --out")


def run(args: argparse.Namespace) -> int:
    """Score INPUT into OUT, resuming from OUT (the rules are in vlm_judge.store's docstring)."""
    try:
        opts = _input_options(args)
        total = count_rows(args.input)  # a missing file or an unsupported type fails before the model loads
        problem = output_problem(args.out, folder=False, name="--out")
        if problem:
            raise ValueError(problem)
        judge = _load_judge(args)
        fingerprint = Fingerprinter(judge)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"vlm-judge score: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with JudgmentStore(args.out, key="id", what="score run") as store:
            return _score(args, opts, judge, fingerprint, store, total)
    except Locked as e:  # another run is writing to OUT: refused at once (see vlm_judge.store)
        print(f"vlm-judge score: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _score(args: argparse.Namespace, opts: InputOptions, judge: Judge, fingerprint: Fingerprinter,
           store: JudgmentStore, total: int | None) -> int:
    out, template = store.path, fingerprint.template_name
    mixed = _other_judge(store, judge, template)
    if mixed:
        print(f"vlm-judge score: {mixed}", file=sys.stderr)
        return EXIT_CONFIG
    from tqdm import tqdm

    order: list[str] = []
    counts = {"skipped": 0, "judged": 0}
    # rows done / total, rate and ETA; the bar moves as rows finish, not once per chunk
    bar = tqdm(desc="scoring", unit="row", total=total, disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    fps: dict[int, str] = {}

    def chunks() -> Iterator[list[JudgeRequest]]:
        """The rows still to judge, in chunks; bad and already-judged rows are settled on the way."""
        chunk: list[JudgeRequest] = []
        for rid, item in read_requests(args.input, opts):
            order.append(rid)
            if isinstance(item, RowError):
                store.add([_error_line(rid, item, judge, args.mode, template)])
                bar.update(1)
                continue
            fp = fingerprint(item)
            if store.reusable(rid, fp) is not None:
                counts["skipped"] += 1
                bar.update(1)
                continue
            fps[id(item)] = fp
            chunk.append(item)
            if len(chunk) >= args.chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    try:
        # chunks are saved as each finishes; several may be in flight (Judge.grade_chunks)
        for chunk, got in judge.grade_chunks(chunks(), progress=bar.update):
            if isinstance(got, Exception):  # a backend crash fails this chunk's rows (retried on re-run)
                why = f"backend failed: {type(got).__name__}: {got}"
                lines = [_error_line(r.id, why, judge, r.mode, template) for r in chunk]
                bar.update(len(chunk))
            else:
                lines = [{**j.to_dict(), FINGERPRINT: fps[id(r)]} for j, r in zip(got, chunk)]
            for r in chunk:
                fps.pop(id(r), None)
            store.add(lines)
            counts["judged"] += len(chunk)
    except (ValueError, FileNotFoundError, OSError) as e:  # the file itself is unreadable
        print(f"vlm-judge score: cannot read {args.input}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        bar.close()
    final = store.compact(order)
    summary = summarize(final)
    summary.update(input=str(args.input), out=str(out), judge=judge.name, template=template,
                   version=__version__, resumed_rows=counts["skipped"], judged_this_run=counts["judged"])
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(format_summary(summary))
    if counts["skipped"]:
        print(f"resumed: {counts['skipped']} rows already judged in {out} were kept")
    if not final or summary["scored"] + summary["parse_failures"] == 0:
        return EXIT_NOTHING
    return EXIT_ROW_ERRORS if summary["errors"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "chunk_size", "max_new_tokens", "n_samples"):
        if getattr(args, name) < 1:
            print(f"vlm-judge score: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_CONFIG
    if args.n_samples > 1 and args.temperature <= 0:
        print("vlm-judge score: --n-samples > 1 needs --temperature > 0 (greedy samples are identical)", file=sys.stderr)
        return EXIT_CONFIG
    return run(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "run"]
