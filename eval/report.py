"""Write the eval report folder: report.md and report.html (same content), PNG plots, the raw
judgments (judgments.jsonl) and every number (metrics.json).

The document is built once as a list of blocks and rendered twice, so the Markdown and the HTML
cannot disagree.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from eval import plots
from eval.agreement import PRIMARY, _clean
from eval.compare import side_by_side
from vlm_judge.redact import redact_urls

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", relpath, alt) | ("list", items)


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ci(d: dict[str, Any] | None) -> str:
    if not isinstance(d, dict) or d.get("value") is None:
        return "n/a"
    if d.get("lo") is None:
        return f"{d['value']:.3f}"
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _paired_cells(p: dict[str, Any]) -> list[str]:
    """A - B, its interval and p; one 'n/a (why)' when there is nothing to compare."""
    if p.get("delta") is None or p["delta"] != p["delta"]:  # None, or NaN from an older run
        return [f"n/a ({p.get('note') or 'no shared items'})", "", ""]
    return [_f(p["delta"]), f"[{_f(p['lo'])}, {_f(p['hi'])}]", _f(p["p_value"])]


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[-60:] or "judge"


def _plots(res: dict[str, Any], out: Path) -> dict[str, list[tuple[str, str]]]:
    """Make every plot; returns {section: [(relative path, alt text)]}."""
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[tuple[str, str]]] = {"absolute": [], "relative": [], "categories": [], "probes": []}
    items = res["items"]
    for label, js in res["judgments"].items():
        s = slug(label)
        abs_idx = [k for k, it in enumerate(items) if it.mode == "absolute"]
        if abs_idx:
            gold = [float(items[k].gold) for k in abs_idx]
            pred = [js[k].score for k in abs_idx]
            p1 = plots.scatter(gold, pred, f"{label}", pdir / f"scatter_{s}.png")
            gr = [int(g + 0.5) for g in gold]
            p2 = plots.confusion(gr, pred, [1, 2, 3, 4, 5], f"{label}", pdir / f"confusion_{s}.png")
            made["absolute"] += [(str(p1.relative_to(out)), f"{label}: human vs judge score (jittered)"),
                                 (str(p2.relative_to(out)), f"{label}: score confusion matrix")]
        rel_idx = [k for k, it in enumerate(items) if it.mode == "relative"]
        if rel_idx:
            p3 = plots.confusion([items[k].gold for k in rel_idx], [js[k].score for k in rel_idx], ["A", "B", "tie"],
                                 f"{label}", pdir / f"confusion_pairwise_{s}.png")
            made["relative"].append((str(p3.relative_to(out)), f"{label}: preference confusion matrix"))
    for mode in ("absolute", "relative"):
        rows = side_by_side(res["metrics"], mode)
        cats = [c for c in dict.fromkeys(r["category"] for r in rows)]
        if not rows:
            continue
        series: dict[str, list[tuple[Any, Any, Any]]] = {}
        for label in res["metrics"]:
            by = {r["category"]: r for r in rows if r["judge"] == label}
            series[label] = [(by.get(c, {}).get("value"), by.get(c, {}).get("lo"), by.get(c, {}).get("hi")) for c in cats]
        p = plots.grouped_bars(cats, series, PRIMARY[mode], f"{PRIMARY[mode]} with humans by category (95% CI)",
                               pdir / f"categories_{mode}.png", ylim=(-1, 1) if mode == "absolute" else (0, 1))
        made["categories"].append((str(p.relative_to(out)), f"{mode}: per-category {PRIMARY[mode]}"))
    probes = res.get("probes") or {}
    names = [n for n in dict.fromkeys(pr["probe"] for prs in probes.values() for pr in prs)]
    if names:
        series = {}
        for label, prs in probes.items():
            by = {pr["probe"]: pr for pr in prs}
            series[label] = [(by.get(n, {}).get("rate"), by.get(n, {}).get("lo"), by.get(n, {}).get("hi")) for n in names]
        p = plots.grouped_bars(names, series, "rate the verdict moved", "bias probes (95% Wilson CI)",
                               pdir / "probes.png", ylim=(0, 1))
        made["probes"].append((str(p.relative_to(out)), "bias probes"))
    return made


def build_blocks(res: dict[str, Any], made: dict[str, list[tuple[str, str]]]) -> list[Block]:
    bench, cfg = res["benchmark"], res["config"]
    B: list[Block] = [("h", 1, f"Judge evaluation: {bench.name}")]
    B.append(("p", f"Benchmark `{bench.source}` (format `{bench.format}`): {bench.rows} rows read, "
                   f"{len(bench.items)} items evaluated, {len(bench.skipped)} rows left out (listed below). "
                   f"vlm-judge {res['version']}; bootstrap {cfg['n_boot']} resamples, seed {cfg['seed']}."))
    B.append(("p", f"Text judges see a caption instead of the image; caption source: **{res['caption_source']}** "
                   f"(bridge: {res['bridge']})."))

    B.append(("h", 2, "Judges"))
    rows = []
    for label, m in res["metrics"].items():
        rows.append([label, m["n"], m["scored"], m["parse_failures"], m["errors"], _pct(m["parse_failure_rate"]),
                     "; ".join(f"{n} x {r}" for r, n in list(m["failure_reasons"].items())[:3]) or "-"])
    B.append(("table", ["judge", "items", "scored", "parse failures", "errors", "unreadable rate", "top reasons"], rows))
    B.append(("p", "Unreadable verdicts are never given a default score: every metric below uses only the "
                   "items the judge scored, and shows how many that was."))

    if any("absolute" in m["overall"] for m in res["metrics"].values()):
        B.append(("h", 2, "Scores (absolute grading) vs humans"))
        rows = []
        for label, m in res["metrics"].items():
            a = m["overall"].get("absolute")
            if not a:
                continue
            rows.append([label, f"{a.get('n_scored')}/{a['n']}", _ci(a.get("pearson")), _ci(a.get("spearman")),
                         _ci(a.get("kendall")), _ci(a.get("exact")), _ci(a.get("within_one")),
                         _f(a.get("kappa_quadratic")), _f(a.get("alpha_interval_with_humans"))])
        B.append(("table", ["judge", "scored", "Pearson", "Spearman", "Kendall tau-b", "exact", "within 1",
                            "kappa (quadratic)", "alpha (interval, judge+humans)"], rows))
        hum = [m["overall"]["absolute"].get("alpha_interval_humans_only") for m in res["metrics"].values()
               if m["overall"].get("absolute")]
        if hum and hum[0] is not None:
            B.append(("p", f"Krippendorff's alpha among the human raters alone: {_f(hum[0])} (a ceiling for judges)."))
        exp_rows = [[label, m["overall"]["absolute"]["expected_score"]["n"],
                     m["overall"]["absolute"]["expected_score"]["forced"],
                     _f(m["overall"]["absolute"]["expected_score"].get("mean_mass")),
                     _ci(m["overall"]["absolute"]["expected_score"]["spearman"]),
                     _ci(m["overall"]["absolute"]["expected_score"]["pearson"])]
                    for label, m in res["metrics"].items()
                    if (m["overall"].get("absolute") or {}).get("expected_score")]
        if exp_rows:
            B.append(("h", 3, "Expected score from the judge's probabilities over 1..5"))
            B.append(("table", ["judge", "items", "marker forced", "mean mass on 1..5", "Spearman", "Pearson"], exp_rows))
            B.append(("p", "The expected score is the mean of 1..5 under the judge's own next-token probabilities at "
                           "the verdict position ('marker forced': the output had no [RESULT] marker and one was "
                           "appended). A low mass on 1..5 means the judge was not about to write a score."))
        for path, alt in made["absolute"]:
            B.append(("img", path, alt))

    if any("relative" in m["overall"] for m in res["metrics"].values()):
        B.append(("h", 2, "Preferences (pairwise) vs humans"))
        rows = []
        for label, m in res["metrics"].items():
            r = m["overall"].get("relative")
            if not r:
                continue
            rows.append([label, f"{r.get('n_scored')}/{r['n']}", _ci(r.get("accuracy")), _f(r.get("accuracy_strict")),
                         _f(r.get("accuracy_three_way")), _pct(r.get("judge_tie_rate")), _f(r.get("kappa")),
                         _pct(r.get("position_consistency"))])
        B.append(("table", ["judge", "scored", "accuracy (ties: half)", "accuracy (strict)", "accuracy (3-way)",
                            "judge ties", "kappa", "position consistency"], rows))
        B.append(("p", "Tie policy: pairs the humans called a tie are left out of 'half' and 'strict'; a judge "
                       "tie on a decided pair earns 0.5 under 'half' and 0 under 'strict'; '3-way' counts every "
                       "pair and needs an exact match. The scorer judges both orders and calls a disagreement a tie."))
        for path, alt in made["relative"]:
            B.append(("img", path, alt))

    for mode in ("absolute", "relative"):
        rows = side_by_side(res["metrics"], mode)
        if rows and any(r["category"] != "all" for r in rows):
            B.append(("h", 2, f"By category ({mode}: {PRIMARY[mode]} with 95% CI)"))
            B.append(("table", ["category", "judge", PRIMARY[mode], "items", "unreadable rate"],
                      [[r["category"], r["judge"], _ci(r) if r.get("value") is not None else "n/a",
                        r.get("n_items", "n/a"), _pct(r.get("parse_failure_rate"))] for r in rows]))
    for path, alt in made["categories"]:
        B.append(("img", path, alt))

    if res.get("paired"):
        B.append(("h", 2, "Paired test: does judge A agree with humans better than judge B?"))
        B.append(("p", "Same items for both judges (items either could not read are left out); difference of the "
                       "metric, 95% bootstrap interval, two-sided bootstrap p-value."))
        B.append(("table", ["judge A", "judge B", "mode", "category", "metric", "A - B", "95% CI", "p", "items"],
                  [[p["judge_a"], p["judge_b"], p["mode"], p["category"], p["metric"], *_paired_cells(p), p["n"]]
                   for p in res["paired"]]))

    if res.get("probes"):
        B.append(("h", 2, "Bias probes"))
        B.append(("p", "Rate at which the verdict moved under each probe (95% Wilson interval). Every probe but "
                       "grounding should NOT move the verdict; grounding (an unrelated image) SHOULD, and a vision "
                       "judge whose verdict does not move is flagged image-blind. 'self' is the rate at which the "
                       "judge favoured its own responses against the humans (relative: it picked its own response where "
                       "the humans preferred the other; absolute: it scored its own response above the human score), "
                       "beside the same overruling rate on other models' responses."))
        rows = []
        for label, prs in res["probes"].items():
            for pr in prs:
                flag = "" if pr.get("flagged") is None else ("IMAGE-BLIND" if pr["flagged"] else "uses image")
                base = f" (others: {_pct(pr['baseline_rate'])})" if pr.get("baseline_rate") is not None else ""
                rate = "n/a" if pr.get("rate") is None else f"{_pct(pr['rate'])} [{_pct(pr['lo'])}, {_pct(pr['hi'])}]"
                expect = "should move" if pr["should_move"] else "near others' rate" if pr["probe"] == "self" else "should not move"
                rows.append([label, pr["probe"], expect,
                             f"{pr['moved']}/{pr['applicable']}", rate + base, pr["unreadable"], flag or pr.get("note", "")])
        B.append(("table", ["judge", "probe", "expected", "moved", "rate", "unreadable", "note"], rows))
        for path, alt in made["probes"]:
            B.append(("img", path, alt))

    B.append(("h", 2, f"Rows left out of the benchmark ({len(bench.skipped)})"))
    if bench.skipped:
        B.append(("table", ["row", "id", "reason"], [[s["row"], s["id"], s["reason"]] for s in bench.skipped[:200]]))
        if len(bench.skipped) > 200:
            B.append(("p", f"... and {len(bench.skipped) - 200} more in metrics.json."))
    else:
        B.append(("p", "None."))
    missing = res.get("caption_missing") or {}
    if missing:
        B.append(("p", f"{len(missing)} items had no caption for the text judges and count as errors for them."))
    B.append(("p", "Files: `metrics.json` (every number), `judgments.jsonl` (raw judgments, one row per judge and "
                   "item), `config.json` (the resolved run configuration), `plots/`."))
    return B


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            out.append("|" + "---|" * len(b[1]))
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    md_inline = lambda s: re.sub(r"`([^`]+)`", r"<code>\1</code>", re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", e(s)))
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{md_inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            body.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f0f0f0}"
             "figure{display:inline-block;margin:0.5em}img{max-width:520px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_report(res: dict[str, Any], out: str | Path) -> Path:
    """Write the report folder from a `run_eval` result; returns the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = _plots(res, out)
    blocks = build_blocks(res, made)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, f"Judge evaluation: {res['benchmark'].name}"), encoding="utf-8")
    bench = res["benchmark"]
    metrics = {
        "benchmark": {"name": bench.name, "source": bench.source, "format": bench.format, "rows": bench.rows,
                      "items": len(bench.items), "skipped": bench.skipped},
        "caption_source": res["caption_source"], "caption_bridge": res["bridge"],
        "caption_missing": res.get("caption_missing") or {},
        "judges": res["metrics"], "paired_tests": res.get("paired") or [], "probes": res.get("probes") or {},
        "version": res["version"],
    }
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2, default=str), encoding="utf-8")
    # server URLs are kept as scheme://host:port/path: no credentials or keys in a report
    (out / "config.json").write_text(json.dumps(redact_urls(_clean(res["config"])), indent=2, default=str),
                                     encoding="utf-8")
    with (out / "judgments.jsonl").open("w", encoding="utf-8") as f:
        for label, js in res["judgments"].items():
            exp = (res.get("expected") or {}).get(label)
            for k, (it, j) in enumerate(zip(res["items"], js)):
                row = {**j.to_dict(), "judge": label, "judge_model": j.judge, "item": it.id,
                       "category": it.category, "gold": it.gold}
                if exp is not None:
                    row["expected_score"] = exp[k]
                f.write(json.dumps(_clean(row), default=str) + "\n")
    return out / "report.md"
