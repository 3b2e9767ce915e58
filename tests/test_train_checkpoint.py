"""Checkpoints are plain data: a resume restores weights, optimizer, scheduler and RNG exactly, and
never unpickles anything (a planted payload does not run; a checkpoint we did not write is refused)."""

from __future__ import annotations

import json
import pickle
import random

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _setup(seed: int = 0):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with torch.no_grad():  # a frozen part (the base model's) is not saved: it is the same in every run
        model[0].weight.copy_(torch.eye(4) * 0.5)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return acc, model, opt, sched


def _step(acc, model, opt, sched):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
    sched.step()
    return float(loss.detach())


@pytest.fixture
def saved(tmp_path):
    acc, model, opt, sched = _setup()
    for _ in range(3):
        _step(acc, model, opt, sched)
    ck = tmp_path / "step-3"
    save_checkpoint(acc, model, opt, sched, ck, step=3, micro_done=3)
    random.random()  # the RNG state after saving, to compare after loading
    expected = {"losses": [_step(acc, model, opt, sched) for _ in range(3)], "py": random.random()}
    return ck, expected


def test_checkpoint_round_trip_continues_identically(saved):
    ck, expected = saved
    assert sorted(p.name for p in ck.iterdir()) == ["optimizer.pt", "rng-0.json", "rng-0.safetensors",
                                                     "scheduler.json", "trainable.safetensors", "trainer_state.json"]
    acc, model, opt, sched = _setup(seed=123)  # other weights and RNG: all restored from the checkpoint
    state = load_checkpoint(acc, model, opt, sched, ck)
    assert state["step"] == 3 and state["micro_batches"] == 3
    random.random()
    assert [_step(acc, model, opt, sched) for _ in range(3)] == pytest.approx(expected["losses"], abs=1e-7)
    assert random.random() == expected["py"]


def test_planted_pickle_in_the_optimizer_file_does_not_run(saved, tmp_path):
    ck, _ = saved
    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, ck / "optimizer.pt")
    acc, model, opt, sched = _setup()
    with pytest.raises(CheckpointError, match="optimizer.pt is not a plain state dict"):
        load_checkpoint(acc, model, opt, sched, ck)
    assert not marker.exists()


def test_a_checkpoint_we_did_not_write_is_refused_without_opening_its_pickles(tmp_path):
    ck = tmp_path / "step-10"  # what accelerate's save_state wrote (the old format)
    ck.mkdir()
    marker = tmp_path / "PWNED"
    with open(ck / "random_states_0.pkl", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    torch.save(_Payload(str(marker)), ck / "custom_checkpoint_0.pkl")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 10, "micro_batches": 10}))
    acc, model, opt, sched = _setup()
    with pytest.raises(CheckpointError, match="was not written by this trainer"):
        load_checkpoint(acc, model, opt, sched, ck)
    assert not marker.exists()
    (ck / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(acc, model, opt, sched, ck)
