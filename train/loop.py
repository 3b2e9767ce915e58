"""The training loop: a short, linear `train(cfg)` on accelerate.

Runs the same on one CPU, one GPU, or N GPUs / nodes under `accelerate launch` (DDP, FSDP,
DeepSpeed ZeRO-2/3 via the configs in train/recipes/accelerate/). One optimizer step per
`grad_accum` micro-batches; the step count, the optimizer, the scheduler, the RNG and the
position in the data are checkpointed (as tensors and JSON, see train/checkpoint.py: a resume
unpickles nothing), so a resumed run continues where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.config import ConfigError, TrainConfig
from train.data import Example, LoadReport, RowContext, RowError, augment, load_examples, split_heldout
from train.encode import Encoder, collate
from train.evaluate import evaluate
from train.judge_folder import save_judge, write_readme
from train.model import load_base, prepare_for_training, resolve_base
from vlm_judge.options import output_problem
from vlm_judge.redact import redact_urls

log = logging.getLogger("vlm_judge.train")


@dataclass
class TrainResult:
    """What a run produced: the judge folder, the last step, and what was logged."""

    output_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    """Mean loss of each optimizer step, in order (this process's view)."""
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    """Non-padding tokens processed by this process."""
    seconds: float = 0.0
    report: LoadReport | None = None
    is_main: bool = True
    """False on the non-main processes of a multi-process run."""
    model: Any = field(default=None, repr=False)
    """The trained model (unwrapped, on this process), for in-process use right after training."""
    processor: Any = field(default=None, repr=False)


class _EncodedDataset:
    """Examples encoded on access (images decoded lazily, so memory stays flat on big datasets)."""

    def __init__(self, examples: list[Example], encoder: Encoder) -> None:
        self.examples, self.encoder = examples, encoder

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        # a row that passed the cheap checks but fails now (e.g. an image that does not decode) is
        # replaced by the next one, with a log line, instead of stopping a long run
        for k in range(len(self.examples)):
            ex = self.examples[(i + k) % len(self.examples)]
            try:
                return self.encoder.encode(ex)
            except RowError as e:
                log.warning("skipping %s at training time: %s", ex.source, e)
        raise RowError("no example could be encoded")


def _validate(examples: list[Example], encoder: Encoder, cfg: TrainConfig, report: LoadReport) -> list[Example]:
    """Drop over-length examples, counted (token counts only: pixels are not preprocessed here)."""
    kept = []
    for ex in examples:
        try:
            n = encoder.length(ex)
            if n > cfg.max_length:
                raise RowError(f"over-length: {n} tokens > max_length {cfg.max_length}")
        except RowError as e:
            if cfg.on_bad_row == "fail":
                raise RowError(f"{ex.source}: {e}") from e
            report.skip(ex.source, str(e))
            continue
        kept.append(ex)
    return kept


def target_only_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over the target tokens, with the LM head applied only where a target is.

    The same loss as `model(**batch).loss` (labels shifted by one, -100 ignored); transformers'
    `logits_to_keep` takes the boolean mask of positions whose next token is a target.
    """
    import torch

    labels = batch["labels"]
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]  # position t predicts token t+1
    keep = nxt != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), nxt[keep])


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return cks[-1] if cks else None


def check_inputs(cfg: TrainConfig) -> None:
    """The mistakes that can be seen without loading anything (data files that are missing or are
    folders, an output folder that is a file or lies under one, a resume folder that is not there),
    as one ConfigError, so they cost no model load and leave nothing behind."""
    problems = []
    for name in ("train_data", "eval_data"):
        for f in getattr(cfg, name):
            p = Path(f)
            if not p.exists():
                problems.append(f"{name}: no such file {f}")
            elif not p.is_file():
                problems.append(f"{name}: {f} is a folder, not a data file")
    if not cfg.train_data:
        problems.append("train_data: required (JSON/JSONL/parquet files)")
    out_problem = output_problem(cfg.output_dir, folder=True, name="output_dir")
    if out_problem:
        problems.append(out_problem)
    b = cfg.base_model
    if b.startswith(("/", "./", "../", "~")) and not Path(b).expanduser().exists():
        problems.append(f"base_model: no such model folder {b}")
    if cfg.resume and cfg.resume != "latest" and not Path(cfg.resume).is_dir():
        problems.append(f"resume: no checkpoint folder {cfg.resume}")
    if problems:
        raise ConfigError("; ".join(problems))


def _progress(step: int, total: int, rows_per_step: int, seconds: float, steps_done: int) -> str:
    """'rows 40/80 (2.1 rows/s, ETA 0:00:19)': this run's rate, so a resumed run's ETA is its own."""
    rate = steps_done / seconds if seconds > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    return f"rows {step * rows_per_step}/{total * rows_per_step} ({rate * rows_per_step:.1f} rows/s, ETA {eta_s})"


def setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s train %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a judge as the recipe says and write the judge folder to cfg.output_dir."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed

    setup_logging()
    check_inputs(cfg)
    out = Path(cfg.output_dir)
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    trackers = []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            trackers = ["tensorboard"]
        except ImportError:
            pass
    acc = Accelerator(
        cpu=not cuda,  # CPU-only: several processes (torchrun / accelerate launch) then use gloo
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if bf16 else "no",
        log_with=trackers or None, project_dir=str(out / "runs"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    info = log.info if acc.is_main_process else log.debug

    # ---- data (rows first: a data mistake costs no model load) -------------------------------
    ctx = RowContext(mode=cfg.mode, image_root=cfg.image_root, image_rewrites=cfg.image_rewrites,
                     allowed_image_dirs=cfg.allowed_image_dirs, kind=cfg.kind)
    examples, report = load_examples(cfg.train_data, ctx, cfg.on_bad_row, cfg.max_rows)
    if not examples:
        raise RowError(f"no usable training examples ({report.summary()})")
    heldout: list[Example] = []
    if cfg.eval_data:
        heldout, _ = load_examples(cfg.eval_data, ctx, cfg.on_bad_row, report=LoadReport())
    elif cfg.eval_fraction:
        examples, heldout = split_heldout(examples, cfg.eval_fraction, cfg.seed)
    heldout = heldout[: cfg.eval_max_rows]
    examples = augment(examples, cfg.swap_augment, cfg.reference_dropout, cfg.seed)

    # ---- model ------------------------------------------------------------------------------
    with acc.main_process_first():  # a tiny base is built once, by the main process
        base = resolve_base(cfg.base_model, out / "_tiny_base")
    model, proc = load_base(base, cfg.kind, dtype=torch.bfloat16 if bf16 else torch.float32,
                            chat_template=cfg.chat_template)
    encoder = Encoder(proc, cfg.kind, cfg.template, max_length=cfg.max_length,
                      image_token_id=getattr(model.config, "image_token_id", None))
    examples = _validate(examples, encoder, cfg, report)
    report.examples = len(examples)
    info("data: %s", report.summary())
    for line in report.first_errors[:5]:
        info("  skipped %s", line)
    if not examples:
        raise RowError(f"no usable training examples ({report.summary()})")

    model = prepare_for_training(model, cfg)
    pad_id = encoder.tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(cfg.seed)
    dl = torch.utils.data.DataLoader(
        _EncodedDataset(examples, encoder), batch_size=cfg.per_device_batch_size, shuffle=True,
        collate_fn=functools.partial(collate, pad_id=pad_id), generator=gen, num_workers=cfg.dataloader_workers,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt, dl = acc.prepare(model, opt, dl)
    micro_per_epoch = len(dl)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    # not prepared: accelerate would step a prepared scheduler once per process
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    # ---- resume -----------------------------------------------------------------------------
    step, micro_done = 0, 0
    if cfg.resume:
        if sharded:
            # a sharded optimizer state has no plain-tensor form here; accelerate's own would be unpickled
            raise CheckpointError("resume under FSDP/DeepSpeed is not supported (it would load pickled state); "
                                  "resume on DDP or one device, or start from the saved judge")
        ck = _latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if ck is None or not ck.is_dir():
            raise CheckpointError(f"resume={cfg.resume!r}: no checkpoint found under {out / 'checkpoints'}")
        state = load_checkpoint(acc, model, opt, sched, ck)
        step, micro_done = state["step"], state["micro_batches"]
        info("resumed from %s at step %d", ck, step)

    if sharded and cfg.save_every:
        log.warning("save_every=%d: no checkpoints under FSDP/DeepSpeed (resume needs a plain-tensor optimizer "
                    "state); the judge folder is still written at the end", cfg.save_every)
    if trackers:
        acc.init_trackers("vlm_judge_train", config={k: str(v) for k, v in cfg.to_dict().items()})
    res = TrainResult(out, step, report=report, is_main=acc.is_main_process)
    info("training %d steps (%d examples, %d micro-batches/epoch, grad_accum %d, %d process(es), %s)",
         total, len(examples), micro_per_epoch, cfg.grad_accum, acc.num_processes, "bf16" if bf16 else "fp32")

    def run_eval() -> None:
        if not heldout:
            return
        if sharded:
            info("in-training eval skipped under FSDP/DeepSpeed (score the saved judge instead)")
            return
        if acc.is_main_process:
            # every judgment is kept beside the judge, in the lines `vlm-judge score` writes
            metrics = evaluate(acc.unwrap_model(model), encoder, heldout, cfg.eval_batch_size, cfg.eval_max_new_tokens,
                               save=Path(cfg.output_dir) / "eval" / f"step-{step}.jsonl")
            res.evals.append({"step": float(step), **metrics})
            info("step %d eval %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if trackers:
                acc.log(metrics, step=step)
        acc.wait_for_everyone()

    model.train()
    t0 = time.perf_counter()
    first_step = step
    rows_per_step = cfg.per_device_batch_size * cfg.grad_accum * acc.num_processes
    window: list[float] = []
    float_dtype = torch.bfloat16 if bf16 else torch.float32
    while step < total:
        epoch = micro_done // micro_per_epoch
        dl.set_epoch(epoch)
        skip = micro_done % micro_per_epoch
        batches = acc.skip_first_batches(dl, skip) if skip else dl
        for batch in batches:
            batch = {k: (v.to(float_dtype) if torch.is_floating_point(v) else v) for k, v in batch.items()}
            with acc.accumulate(model):
                loss = target_only_loss(model, batch) if cfg.target_only_logits else model(**batch).loss
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            micro_done += 1
            res.tokens += int(batch["attention_mask"].sum())
            window.append(float(loss.detach()))
            if not acc.sync_gradients:
                continue
            sched.step()
            step += 1
            res.losses.append(sum(window) / len(window))
            window = []
            if step % cfg.log_every == 0 or step == total:
                info("step %d/%d loss %.4f lr %.2e %s", step, total, res.losses[-1], sched.get_last_lr()[0],
                     _progress(step, total, rows_per_step, time.perf_counter() - t0, step - first_step))
                if trackers:
                    acc.log({"train/loss": res.losses[-1], "train/lr": sched.get_last_lr()[0]}, step=step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
            if cfg.save_every and step % cfg.save_every == 0 and not sharded:
                _checkpoint(acc, model, opt, sched, out, step, micro_done, cfg.keep_checkpoints)
            if step >= total:
                break
    res.seconds = time.perf_counter() - t0
    res.step = step
    if not cfg.eval_every or step % cfg.eval_every:
        run_eval()

    # ---- the judge folder -------------------------------------------------------------------
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    state_dict = acc.get_state_dict(model) if sharded else None
    if acc.is_main_process:
        save_judge(unwrapped, proc, out, cfg, base_model=_card_base(base),
                   merge_adapter=cfg.merge_adapter_on_save, state_dict=state_dict, steps=step)
        (out / "train_log.json").write_text(json.dumps(redact_urls(
            {"steps": step, "losses": res.losses, "evals": res.evals, "data": report.summary(),
             "skipped": dict(report.skipped)}), indent=1))
        write_readme(out, cfg, base_model=_card_base(base), steps=step, evals=res.evals,
                     data_summary=report.summary(), skipped=dict(report.skipped))
        info("judge written to %s (%s)", out, report.summary())
    if trackers:
        acc.end_training()
    res.model, res.processor = unwrapped, proc
    return res


def _card_base(base: str) -> str:
    return str(Path(base).resolve()) if Path(base).exists() else base


def _checkpoint(acc: Any, model: Any, opt: Any, sched: Any, out: Path, step: int, micro_done: int, keep: int) -> None:
    ck = out / "checkpoints" / f"step-{step}"
    save_checkpoint(acc, model, opt, sched, ck, step, micro_done)
    if acc.is_main_process:
        cks = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in cks[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", ck)
    acc.wait_for_everyone()
