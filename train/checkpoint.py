"""Training checkpoints that load without unpickling anything.

accelerate's `save_state`/`load_state` store the RNG and custom objects as pickles and read them
back with `weights_only=False`, so a planted checkpoint runs code on resume. A checkpoint here is
plain data only:

    trainable.safetensors   the trainable parameters (the LoRA adapter, or all weights)
    optimizer.pt            the optimizer's state dict: tensors and plain values, read back with
                            torch.load(weights_only=True), which refuses any other object
    scheduler.json          the LR scheduler's state dict
    rng-<rank>.safetensors  torch's CPU (and CUDA) generator states of each process
    rng-<rank>.json         Python's and NumPy's generator states of each process
    trainer_state.json      step, micro-batches, accelerate's accumulation counter, and `format`

A folder without our `format` marker (e.g. one accelerate wrote) is refused, and its files are
never opened.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

FORMAT = "vlm_judge-checkpoint/1"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, was not written by this trainer, or holds something other than plain data."""


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(acc: Any, model: Any, opt: Any, sched: Any, ck: Path, step: int, micro_done: int) -> None:
    """Write a checkpoint into folder `ck` (every process calls this: each saves its own RNG state)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    ck = Path(ck)
    if acc.is_main_process:
        ck.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    rank = acc.process_index
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(ck / f"rng-{rank}.safetensors"))
    py = random.getstate()
    npy = np.random.get_state()
    (ck / f"rng-{rank}.json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }))
    if acc.is_main_process:
        weights = {n: p.detach().to("cpu").contiguous().clone() for n, p in _trainable(acc.unwrap_model(model)).items()}
        save_file(weights, str(ck / "trainable.safetensors"))
        torch.save(opt.state_dict(), ck / "optimizer.pt")
        (ck / "scheduler.json").write_text(json.dumps(sched.state_dict()))
        # written last: a folder without it is an unfinished checkpoint
        (ck / STATE_FILE).write_text(json.dumps({
            "format": FORMAT, "step": step, "micro_batches": micro_done, "accelerate_step": int(acc.step),
            "processes": acc.num_processes,
        }))
    acc.wait_for_everyone()


def read_state(ck: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint we wrote, or CheckpointError saying why not."""
    p = Path(ck) / STATE_FILE
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ck} is not a complete checkpoint: cannot read {STATE_FILE} ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{ck} was not written by this trainer (no format {FORMAT!r} in {STATE_FILE}); refusing to load it, "
            "since older and foreign checkpoints hold pickled state that would run code on loading")
    return state


def load_checkpoint(acc: Any, model: Any, opt: Any, sched: Any, ck: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint we wrote; returns its state."""
    import numpy as np
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ck = Path(ck)
    state = read_state(ck)
    if state.get("processes") not in (None, acc.num_processes):
        raise CheckpointError(f"{ck} was written by {state['processes']} process(es); this run has "
                              f"{acc.num_processes} (the data position and RNG states would not line up)")
    try:
        weights = load_file(str(ck / "trainable.safetensors"))
        rng = load_file(str(ck / f"rng-{acc.process_index}.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{ck}: cannot read its tensors ({e})") from e
    try:
        opt_state = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign object, OSError, RuntimeError for a bad file
        raise CheckpointError(f"{ck}/optimizer.pt is not a plain state dict of tensors; refusing it ({e})") from e
    try:
        sched_state = json.loads((ck / "scheduler.json").read_text())
        rng_json = json.loads((ck / f"rng-{acc.process_index}.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ck}: cannot read its JSON state ({e})") from e

    params = _trainable(acc.unwrap_model(model))
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise CheckpointError(f"{ck} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    py = rng_json["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng_json["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    acc.step = int(state.get("accelerate_step", 0))
    return state
