"""The eval run: load a benchmark, grade it with each judge (vision judges see the image, text
judges a caption), compute metrics, paired tests and probes, and hand the result to the report.

`EvalConfig` is the resolved configuration (saved as config.json in the report folder);
`run_eval` is a short linear function over the modules that do the work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eval.agreement import _clean, judge_metrics
from eval.benchmarks import load_benchmark
from eval.captions import BRIDGE_SOURCE, caption_with_model
from eval.compare import paired_tests, text_requests
from eval.expected import expected_scores, supports_probs
from eval.probes import PROBES, run_probe
from eval.report import slug
from eval.run import JudgeSpec, error_judgment, judge_cached, parse_judge
from vlm_judge import __version__
from vlm_judge.backends import get_backend
from vlm_judge.jsonl import exclusive_lock
from vlm_judge.judge_options import DEFAULT_RETRIES, JudgeOptions, split_urls
from vlm_judge.scorer import Judge


@dataclass
class EvalConfig:
    """Everything one `vlm-judge eval` run depends on. Bad combinations fail here."""

    bench: str
    judges: list[str]
    """Judge names or folders, optionally prefixed 'text:' or 'vision:' and suffixed '@backend'."""
    out: str = "eval_report"
    backend: str | None = None
    """Backend for judges without '@BACKEND' (default: 'openai' for a judge with a server URL, else
    from its card, 'mock' for 'mock', else 'hf')."""
    format: str | None = None
    column_map: str | dict[str, str] | None = None
    """FIELD=COLUMN pairs ('a=b,c=d' or a mapping)."""
    rubric: str | None = None
    """A rubric file for rows without their own: JSON, YAML, the 'Score N:' text form, or a {name: rubric}
    library (the files `score --rubric` takes; read by `vlm_judge.inputs.load_rubrics`)."""
    image_root: str | None = None
    image_rewrites: dict[str, str] = field(default_factory=dict)
    gold_scale: tuple[float, float] = (1.0, 5.0)
    limit: int | None = None
    probes: list[str] = field(default_factory=list)
    caption_model: str | None = None
    """Caption images with this model for text judges (else the benchmark's captions)."""
    caption_backend: str = "hf"
    base_urls: list[str] = field(default_factory=list)
    """OpenAI-compatible servers: 'URL' for every judge (and the captioner), 'NAME=URL' for the judge
    NAME alone (see `vlm_judge.judge_options`)."""
    base_url: str | None = None
    """One server for every judge (the same as base_urls=[base_url])."""
    backend_args: dict[str, Any] = field(default_factory=dict)
    """Extra backend options for every loaded judge (e.g. timeout, concurrency, api_key, device)."""
    template: str | None = None
    """Prompt template for loaded judges (default: each judge card's, else 'default')."""
    self_models: dict[str, list[str]] = field(default_factory=dict)
    """judge label or name -> model names whose responses that judge wrote (self-preference probe)."""
    expected_score: bool = False
    batch_size: int = 8
    max_parse_retries: int = DEFAULT_RETRIES
    max_new_tokens: int = 512
    """Generation budget per judgment."""
    temperature: float = 0.0
    top_p: float = 1.0
    n_boot: int = 1000
    seed: int = 0
    """Seeds the judges' sampling and the bootstrap."""

    def __post_init__(self) -> None:
        if not self.judges:
            raise ValueError("give at least one --judge")
        bad = [p for p in self.probes if p not in PROBES]
        if bad:
            raise ValueError(f"unknown probe(s) {bad}; choose from {list(PROBES)}")
        labels = [parse_judge(j).label for j in self.judges]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"judge named twice: {sorted(dup)}")
        if self.n_boot < 100:
            raise ValueError("n_boot must be at least 100 for a usable interval")
        self.judge_options()  # bad URLs or generation settings fail here, before any judge loads

    def judge_options(self) -> JudgeOptions:
        """The shared judge options this run loads its judges with."""
        shared, per_judge = split_urls(list(self.base_urls) + ([self.base_url] if self.base_url else []))
        return JudgeOptions(backend=self.backend, base_urls=shared, judge_urls=per_judge,
                            backend_args=dict(self.backend_args), template=self.template,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                            seed=self.seed, retries=self.max_parse_retries)


def _load_judge(spec: JudgeSpec, raw: str, cfg: EvalConfig) -> Judge:
    opts = cfg.judge_options()
    urls = opts.urls_for(spec.name, raw, spec.label)
    config = opts.scorer_config(spec.name, batch_size=cfg.batch_size)
    return Judge.load(spec.name, backend=opts.backend_for(spec.name, urls, spec.backend), config=config,
                      **opts.backend_kwargs(urls))


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _bar(desc: str, on: bool) -> Callable[[int, int], None] | None:
    """A progress callback (done, total) drawing a tqdm bar on stderr (items done / total, rate, ETA)
    for the items still to judge (cached ones are not redone); None when progress is off."""
    if not on:
        return None
    from tqdm import tqdm

    bar: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="item", file=sys.stderr))
        bar[0].total = total
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return update


def _shared_items(paired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired tests with nothing to compare say so (None, not NaN, and a note)."""
    out = []
    for p in paired:
        p = _clean(p)
        if p.get("delta") is None:
            p["note"] = "no shared items" if not p.get("n") else "too few shared items"
        out.append(p)
    return out


def run_eval(cfg: EvalConfig, judges: dict[str, Judge] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the evaluation. `judges` ({spec string: Judge}) supplies ready-made judges (Python API);
    `progress` draws a bar on stderr while judging and probing. Judgments are cached under
    OUT/cache and reused by a re-run (see `vlm_judge.store`)."""
    bench = load_benchmark(
        cfg.bench, format=cfg.format, column_map=cfg.column_map, rubric=cfg.rubric or None,
        image_root=cfg.image_root, image_rewrites=cfg.image_rewrites or None, gold_scale=cfg.gold_scale,
        limit=cfg.limit,
    )
    _log(f"{bench.name}: {len(bench.items)} items, {len(bench.skipped)} rows left out ({bench.format})")
    if not bench.items:
        raise ValueError(f"no usable items in {cfg.bench}; reasons: {[s['reason'] for s in bench.skipped[:5]]}")
    # one run at a time per report folder: a second is refused at once (vlm_judge.jsonl.Locked)
    cache = Path(cfg.out) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache, "eval"):
        return _evaluate(cfg, bench, judges, progress)


def _evaluate(cfg: EvalConfig, bench: Any, judges: dict[str, Judge] | None, progress: bool) -> dict[str, Any]:
    items = bench.items
    out = Path(cfg.out)
    specs = [parse_judge(j) for j in cfg.judges]

    caption_source, model_caps, cap_errors = "benchmark", None, {}
    if any(s.kind == "text" for s in specs) and bench.has_images and cfg.caption_model:
        _log(f"captioning images with {cfg.caption_model}")
        opts = cfg.judge_options()
        kw = opts.backend_kwargs(opts.urls_for(cfg.caption_model)) if cfg.caption_backend == "openai" else {}
        cap_backend = get_backend(cfg.caption_backend, model=cfg.caption_model, **kw)
        model_caps, cap_errors, how = caption_with_model(cap_backend, [it.request for it in items])
        caption_source = f"{how} [{cfg.caption_backend} backend]"
    caption_missing: dict[str, str] = {}

    results: dict[str, list] = {}
    requests_by: dict[str, list] = {}
    judge_objs: dict[str, Judge] = {}
    expected: dict[str, list] = {}
    notes: list[str] = []
    for spec, raw in zip(specs, cfg.judges):
        judge = (judges or {}).get(raw) or _load_judge(spec, raw, cfg)
        judge_objs[spec.label] = judge
        if spec.kind == "text":
            reqs, missing = text_requests(items, model_caps)
            by_id = {it.id: it for it in items}
            for k, v in missing.items():
                key = by_id[k].request.image_key
                caption_missing[k] = f"{v}: {cap_errors[key]}" if key in cap_errors else v
        else:
            reqs = [it.request for it in items]
        ok = [k for k, r in enumerate(reqs) if r is not None]
        _log(f"judging {len(ok)} items with {spec.label}")
        got = judge_cached(judge, [reqs[k] for k in ok], out / "cache" / slug(spec.label) / "judgments.jsonl",
                           progress=_bar(f"judging ({spec.label})", progress))
        js = [error_judgment(it.request, judge.name, caption_missing.get(it.id, "not judged")) for it in items]
        for k, j in zip(ok, got):
            js[k] = j
        results[spec.label] = js
        requests_by[spec.label] = reqs
        if cfg.expected_score:
            if supports_probs(judge):
                exp = [None] * len(items)
                for k, e in zip(ok, expected_scores(judge, [reqs[k] for k in ok], [js[k] for k in ok])):
                    exp[k] = e
                expected[spec.label] = exp
            else:
                notes.append(f"{spec.label}: backend has no next_token_probs; no expected score")

    metrics = {label: judge_metrics(items, js, expected.get(label), n_boot=cfg.n_boot, seed=cfg.seed)
               for label, js in results.items()}
    paired = _shared_items(paired_tests(items, results, n_boot=cfg.n_boot, seed=cfg.seed)) if len(results) > 1 else []

    probes: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        label, judge, reqs = spec.label, judge_objs[spec.label], requests_by[spec.label]
        ok = [k for k, r in enumerate(reqs) if r is not None]
        names = [spec.name, Path(spec.name).name, *cfg.self_models.get(label, []), *cfg.self_models.get(spec.name, [])]
        probes[label] = []
        for p in cfg.probes:
            _log(f"probe {p} on {label}")
            r = run_probe(p, judge, [items[k] for k in ok], [reqs[k] for k in ok], [results[label][k] for k in ok],
                          cache_dir=out / "cache" / slug(label), self_names=names, judge_kind=spec.kind,
                          progress=_bar(f"probe {p} ({label})", progress))
            probes[label].append(_clean(r.to_dict()))
    return {
        "benchmark": bench, "items": items, "judgments": results, "metrics": metrics, "paired": paired,
        "probes": probes if cfg.probes else {}, "expected": expected, "caption_source": caption_source,
        "caption_missing": caption_missing, "bridge": BRIDGE_SOURCE, "notes": notes,
        "config": asdict(cfg), "version": __version__,
    }
