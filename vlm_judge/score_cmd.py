"""`vlm-judge score INPUT --judge NAME_OR_PATH --out OUT.jsonl`: score every row of a file.

Rows are read one at a time (`vlm_judge.inputs`), scored in chunks, and appended to OUT as each
chunk finishes, so a killed run loses at most one chunk. A re-run with the same OUT skips rows
already judged (status ok or parse_failure) and redoes rows that errored; at the end OUT is
rewritten once, one line per input row, in input order, with no duplicates. A bad row gets a
line with status "error" and the reason; the other rows are still scored.

Exit status: 0 when every row was judged (parse failures are judgments too), 3 when some rows
errored (their reasons are in OUT and the summary), 1 when no row could be judged, 2 for a bad
command line or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlm_judge import __version__
from vlm_judge.backends import GenerationParams
from vlm_judge.inputs import InputOptions, RowError, load_rubrics, read_requests
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import JUDGE_CARD, Judge, ScorerConfig
from vlm_judge.summary import format_summary, summarize

DONE = ("ok", "parse_failure")
"""Statuses a re-run keeps; 'error' rows are retried."""

EXIT_OK, EXIT_NOTHING, EXIT_CONFIG, EXIT_ROW_ERRORS = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-judge score", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="rows to score: .jsonl, .json, .csv, .parquet, .arrow or a datasets folder")
    p.add_argument("--judge", required=True, help="'mock', a judge folder, a model path/name, or a served model's name")
    p.add_argument("--out", required=True, help="output JSONL (re-runs resume from it)")
    p.add_argument("--backend", help="hf, openai, vllm, mock or a registered backend "
                   "(default: the judge folder's card, 'openai' with --base-url, else 'hf')")
    p.add_argument("--base-url", action="append", default=[], metavar="URL",
                   help="OpenAI-compatible server; repeat to spread rows over several")
    p.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra backend option, e.g. device=cuda:0, dtype=bfloat16, concurrency=16 (value parsed as JSON when it can be)")
    p.add_argument("--template", help="default, prefix, or a template file (default: the judge card's, else 'default')")
    p.add_argument("--mode", choices=["auto", "absolute", "relative"], default="auto",
                   help="auto: relative for rows with response_b, absolute otherwise")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per backend call")
    p.add_argument("--chunk-size", type=int, default=64, help="rows scored (and saved) together")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=1, help="generations per row (needs --temperature > 0)")
    p.add_argument("--aggregate", choices=["mean", "majority"], default="mean")
    p.add_argument("--retries", type=int, default=2, help="extra generations for an output that did not parse")
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


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(",") if flag == "--column-map" else [item]:
            if "=" not in part:
                raise ValueError(f"{flag} expects KEY=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip() if flag == "--column-map" else v
    return out


def _backend_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for k, v in _pairs(args.backend_arg, "--backend-arg").items():
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    if len(args.base_url) == 1:
        kw["base_url"] = args.base_url[0]
    elif args.base_url:
        kw["base_urls"] = args.base_url
    return kw


def _load_judge(args: argparse.Namespace) -> Judge:
    card_path = Path(args.judge) / JUDGE_CARD
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    config = ScorerConfig(
        template=args.template or card.get("template", "default"), batch_size=args.batch_size,
        max_parse_retries=args.retries, n_samples=args.n_samples, aggregate=args.aggregate,
        swap=not args.no_swap, params=params,
    )
    # fail on a bad template now, not after the model has loaded
    from vlm_judge.prompts import get_template

    get_template(config.template, "absolute")
    return Judge.load(args.judge, backend=args.backend, config=config, **_backend_kwargs(args))


def _input_options(args: argparse.Namespace) -> InputOptions:
    default_rubric, library = (None, {})
    if args.rubric:
        default_rubric, library = load_rubrics(args.rubric)
    return InputOptions(
        image_root=args.image_root, image_rewrites=_pairs(args.image_rewrite, "--image-rewrite"),
        allowed=args.image_allow, column_map=_pairs(args.column_map, "--column-map"), mode=args.mode,
        default_rubric=default_rubric, rubrics=library, max_pixels=args.max_pixels,
    )


def read_output(path: Path) -> dict[str, dict[str, Any]]:
    """The last line per id of an existing output file (a torn last line from a kill is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                done[str(row["id"])] = row
    return done


def _template_name(judge: Judge) -> str:
    """The name judgments record (a template file's stem, not its path)."""
    from vlm_judge.prompts import get_template

    return get_template(judge.config.template, "absolute").name


def _end_torn_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: close it, so the next line
    appended is not glued to it (the torn line is unreadable, skipped, and dropped when compacting)."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _error_line(rid: str, err: RowError | str, judge: Judge, mode: str) -> dict[str, Any]:
    reason = err.reason if isinstance(err, RowError) else err
    j = Judgment(id=rid, mode="relative" if mode == "relative" else "absolute", score=None, status="error",
                 reason=reason, attempts=0, judge=judge.name, template=_template_name(judge), version=__version__)
    return j.to_dict()


def _grade(judge: Judge, chunk: list[JudgeRequest]) -> list[dict[str, Any]]:
    try:
        return [j.to_dict() for j in judge.grade(chunk)]
    except Exception as e:  # a backend crash fails this chunk's rows (retried on re-run), not the run
        return [_error_line(r.id, f"backend failed: {type(e).__name__}: {e}", judge, r.mode) for r in chunk]


def _compact(out: Path, order: list[str]) -> list[dict[str, Any]]:
    """Rewrite OUT with one line per id: this input's rows in input order, then any other ids."""
    latest = read_output(out)
    rows = [latest[i] for i in order if i in latest]
    in_input = set(order)
    rows += [r for k, r in latest.items() if k not in in_input]
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # atomic: a kill here leaves the old file, never a half one
    return [latest[i] for i in order if i in latest]


def run(args: argparse.Namespace) -> int:
    try:
        opts = _input_options(args)
        if not Path(args.input).exists():
            raise FileNotFoundError(f"input not found: {args.input}")
        judge = _load_judge(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"vlm-judge score: {e}", file=sys.stderr)
        return EXIT_CONFIG
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = read_output(out)
    other = {(r.get("judge"), r.get("template")) for r in previous.values() if r.get("status") in DONE}
    other.discard((judge.name, _template_name(judge)))
    if other:  # resuming would mix two judges' verdicts in one file
        judge_, template = sorted(other, key=str)[0]
        print(f"vlm-judge score: {out} holds judgments by judge {judge_!r} with template {template!r}, not "
              f"{judge.name!r} with {_template_name(judge)!r}; choose another --out", file=sys.stderr)
        return EXIT_CONFIG
    skip = {k for k, r in previous.items() if r.get("status") in DONE}
    from tqdm import tqdm

    order: list[str] = []
    counts = {"skipped": 0, "judged": 0}
    bar = tqdm(desc="scoring", unit="row", disable=args.no_progress, file=sys.stderr)
    _end_torn_line(out)
    with out.open("a", encoding="utf-8") as f:
        def write(lines: list[dict[str, Any]]) -> None:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(lines))

        chunk: list[JudgeRequest] = []
        try:
            for rid, item in read_requests(args.input, opts):
                order.append(rid)
                if rid in skip:
                    counts["skipped"] += 1
                    bar.update(1)
                    continue
                if isinstance(item, RowError):
                    write([_error_line(rid, item, judge, args.mode)])
                    continue
                chunk.append(item)
                if len(chunk) >= args.chunk_size:
                    write(_grade(judge, chunk))
                    counts["judged"] += len(chunk)
                    chunk = []
            if chunk:
                write(_grade(judge, chunk))
                counts["judged"] += len(chunk)
        except (ValueError, FileNotFoundError, OSError) as e:  # the file itself is unreadable
            print(f"vlm-judge score: cannot read {args.input}: {e}", file=sys.stderr)
            return EXIT_CONFIG
        finally:
            bar.close()
    final = _compact(out, order)
    summary = summarize(final)
    summary.update(input=str(args.input), out=str(out), judge=judge.name, template=_template_name(judge),
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


__all__ = ["build_parser", "main", "read_output", "run"]
