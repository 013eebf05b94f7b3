"""The training step's arithmetic on a CPU: float32 as nnU-Net, or bfloat16 forward passes.

``OarbenchTrainer.train_step`` with ``precision="bf16"`` runs the network's forward pass under
bfloat16 autocast and keeps the loss, the gradients and the weights in float32. The checks here
look at the dtypes the convolutions and the loss see (forward hooks), compare the gradients with
those of nnU-Net's own float32 step from the same weights and batch, and compare ``auto`` with the
CPU's flags as the kernel reports them (/proc/cpuinfo), not with torch's own check.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from tests._unet import plain_conv_unet  # noqa: E402

from oarbench.train import trainer as trainer_module  # noqa: E402
from oarbench.train.nnunet import TrainerOptions  # noqa: E402
from oarbench.train.trainer import OarbenchTrainer  # noqa: E402

ARCH = plain_conv_unet([8, 16, 32])
CLASSES = 4


def _bare_trainer(precision: str) -> tuple[OarbenchTrainer, list]:
    """An OarbenchTrainer holding only what a training step uses, and the dtypes it records."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(3)
    net = get_network_from_plans(ARCH["network_class_name"], ARCH["arch_kwargs"], ARCH["_kw_requires_import"], 1,
                                 CLASSES, allow_init=True, deep_supervision=True)
    seen: list = []
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(("conv", out.dtype)))

    def loss(outputs, targets):
        seen.append(("loss", tuple(o.dtype for o in outputs)))
        return sum(torch.nn.functional.cross_entropy(o, t[:, 0].long()) for o, t in zip(outputs, targets))

    t = OarbenchTrainer.__new__(OarbenchTrainer)  # the step needs no plans or dataset
    t.configure(num_epochs=1, iterations_per_epoch=1, val_iterations_per_epoch=0, precision=precision)
    t.network, t.loss, t.device, t.grad_scaler = net, loss, torch.device("cpu"), None
    t.optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    return t, seen


def _batch() -> dict:
    g = torch.Generator().manual_seed(5)
    data = torch.randn(4, 1, 32, 32, generator=g)
    target = torch.randint(0, CLASSES, (4, 1, 32, 32), generator=g).float()
    return {"data": data, "target": [target, target[:, :, ::2, ::2]]}


def test_bf16_step_autocasts_the_forward_pass_and_keeps_float32_loss_gradients_and_weights() -> None:
    batch = _batch()
    t32, seen32 = _bare_trainer("fp32")
    t16, seen16 = _bare_trainer("bf16")
    t16.network.load_state_dict(copy.deepcopy(t32.network.state_dict()))
    t32.train_step(batch)
    t16.train_step(batch)
    # deep supervision: one output per decoder stage (2 here), each float32 when the loss sees it
    assert seen32 == [("conv", torch.float32), ("loss", (torch.float32,) * 2)]
    assert seen16 == [("conv", torch.bfloat16), ("loss", (torch.float32,) * 2)]
    g32 = torch.cat([p.grad.flatten() for p in t32.network.parameters()])
    g16 = torch.cat([p.grad.flatten() for p in t16.network.parameters()])
    assert g16.dtype == torch.float32 and all(p.dtype == torch.float32 for p in t16.network.parameters())
    assert not torch.equal(g16, g32)  # the arithmetic did change
    cosine = float(torch.nn.functional.cosine_similarity(g16.double(), g32.double(), dim=0))
    # the same descent direction up to bfloat16's 8-bit mantissa (0.989 measured); for scale, float32
    # gradients of the same weights on other images of the same targets measured 0.25
    assert cosine > 0.97, cosine
    assert t16.step_count == 1


def test_precision_is_checked_and_travels_in_the_options() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainerOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        OarbenchTrainer.__new__(OarbenchTrainer).configure(num_epochs=1, iterations_per_epoch=1,
                                                           val_iterations_per_epoch=0, precision="half")
    options = TrainerOptions(precision="auto")
    assert options.spec()["precision"] == "auto"
    assert TrainerOptions.from_json(options.to_json()) == options
    assert TrainerOptions().precision == "fp32"  # nnU-Net's arithmetic on a CPU unless asked


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(trainer_module, "native_bf16", lambda: native)
    t = OarbenchTrainer.__new__(OarbenchTrainer)
    t.configure(num_epochs=1, iterations_per_epoch=1, val_iterations_per_epoch=0, precision="auto")
    assert t.precision == ("bf16" if native else "fp32")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="the flags are read from Linux's /proc/cpuinfo on x86")
def test_native_bf16_agrees_with_the_kernels_cpu_flags() -> None:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert flags, "no flags line in /proc/cpuinfo"
    assert trainer_module.native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
