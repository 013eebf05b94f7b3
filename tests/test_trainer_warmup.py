"""The learning-rate warm-up of ``OarbenchTrainer``: the rate each optimizer step uses, against the formula.

The oracle is written here from the definition (nnU-Net's poly rate of the epoch, times
``(i + 1) / warmup`` for the schedule's iteration ``i`` while ``i < warmup``), not taken from the
trainer. The steps run through the trainer's own ``on_train_epoch_start`` and ``train_step`` (nnU-Net's
epoch start sets the poly rate), once in one trainer and once with a new trainer per epoch, as a
federated site's rounds build theirs; and AdamW's first step, whose size is the learning rate, shows
that the rate reaches the update.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from oarbench.train.nnunet import TrainerOptions  # noqa: E402
from oarbench.train.trainer import OarbenchTrainer  # noqa: E402

EPOCHS, ITERATIONS, LR = 4, 5, 0.01


def expected_lr(i: int, warmup: int) -> float:
    """The learning rate of the schedule's iteration ``i`` (0-based)."""
    poly = LR * (1 - (i // ITERATIONS) / EPOCHS) ** 0.9
    return poly * min(1.0, (i + 1) / warmup) if warmup else poly


def _trainer(warmup: int, network: torch.nn.Module, log: list[str]) -> OarbenchTrainer:
    """An OarbenchTrainer holding only what an epoch start and a training step use."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    t = OarbenchTrainer.__new__(OarbenchTrainer)  # no plans or dataset needed
    t.configure(num_epochs=EPOCHS, iterations_per_epoch=ITERATIONS, val_iterations_per_epoch=0, warmup=warmup)
    t.network, t.device, t.grad_scaler = network, torch.device("cpu"), None
    t.loss = lambda output, target: ((output - target) ** 2).mean()
    t.optimizer = torch.optim.AdamW(network.parameters(), lr=LR, weight_decay=0.0)
    t.lr_scheduler = PolyLRScheduler(t.optimizer, LR, EPOCHS)
    t.logger = SimpleNamespace(log=lambda key, value, step: None)  # nnU-Net logs the epoch's rate
    t.print_to_log_file = lambda *args, **kwargs: log.append(" ".join(map(str, args)))
    return t


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"data": torch.randn(2, 3, generator=g), "target": torch.randn(2, 2, generator=g)}


def _run(warmup: int, trainer_per_epoch: bool) -> tuple[list[float], list[str]]:
    """Every step's learning rate over the whole schedule (read in the optimizer's step hook)."""
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 2)
    rates: list[float] = []
    log: list[str] = []
    t = None
    for epoch in range(EPOCHS):
        if t is None or trainer_per_epoch:
            t = _trainer(warmup, network, log)
            t.optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
        t.current_epoch = epoch
        t.on_train_epoch_start()
        for _ in range(ITERATIONS):
            t.train_step(_batch())
    return rates, log


@pytest.mark.parametrize("trainer_per_epoch", [False, True])
@pytest.mark.parametrize("warmup", [0, 1, 7, 10, 100])
def test_each_step_uses_the_warmed_up_poly_rate(warmup: int, trainer_per_epoch: bool) -> None:
    rates, log = _run(warmup, trainer_per_epoch)
    want = [expected_lr(i, warmup) for i in range(EPOCHS * ITERATIONS)]
    assert rates == pytest.approx(want, rel=1e-12, abs=0)
    if warmup == 7:  # the warm-up ends inside the second epoch; the rest of it has the epoch's poly rate
        assert rates[6] == pytest.approx(LR * (1 - 1 / EPOCHS) ** 0.9)  # the warm-up's last: factor 7/7
        assert rates[7:10] == pytest.approx([LR * (1 - 1 / EPOCHS) ** 0.9] * 3)
        assert [line for line in log if "warm-up" in line] == [
            f"oarbench: learning-rate warm-up, iterations 1-5 of 7: learning rate {LR / 7:.6g} to {LR * 5 / 7:.6g}",
            f"oarbench: learning-rate warm-up, iterations 6-7 of 7: learning rate "
            f"{LR * 0.75 ** 0.9 * 6 / 7:.6g} to {LR * 0.75 ** 0.9:.6g}"]
    if warmup == 0:
        assert not any("warm-up" in line for line in log)


def test_adamw_first_step_moves_each_weight_by_the_warmed_up_rate() -> None:
    """AdamW's first update is the learning rate times the gradient's sign (its moments are that one gradient),
    so the largest weight change is the rate the step used: LR / warmup."""
    for warmup in (0, 4):
        torch.manual_seed(0)
        network = torch.nn.Linear(3, 2)
        before = [p.detach().clone() for p in network.parameters()]
        t = _trainer(warmup, network, [])
        t.current_epoch = 0
        t.on_train_epoch_start()
        t.train_step(_batch())
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(network.parameters(), before))
        assert moved == pytest.approx(LR / max(warmup, 1), rel=1e-5)


def test_warmup_is_checked_and_travels_in_the_options() -> None:
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="warmup must be a non-negative number of iterations"):
            TrainerOptions(warmup=bad)
        with pytest.raises(ValueError, match="warmup must be a non-negative number of iterations"):
            OarbenchTrainer.__new__(OarbenchTrainer).configure(num_epochs=1, iterations_per_epoch=1,
                                                               val_iterations_per_epoch=0, warmup=bad)
    options = TrainerOptions(warmup=100)
    assert options.spec()["warmup"] == 100
    assert TrainerOptions.from_json(options.to_json()) == options
    assert TrainerOptions().warmup == 0  # nnU-Net's schedule unless asked
