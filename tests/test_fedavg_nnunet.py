"""FedAvg on real nnU-Net state dicts equals the case-weighted mean computed independently.

The networks are nnU-Net's own (``get_network_from_plans`` with a PlainConvUNet
architecture as nnU-Net plans it, deep supervision on), whose state dicts register
the encoder twice; the weights travel deduplicated (``state_to_arrays``), are
averaged by :func:`oarbench.train.aggregate.fedavg` and restored with their aliases
(``arrays_to_state``). The expected value is computed here from the two original
torch state dicts in float64, key by key.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from tests._unet import plain_conv_unet  # noqa: E402

ARCH = plain_conv_unet([8, 16, 32, 64])


def _network(seed: int):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    net = get_network_from_plans(ARCH["network_class_name"], ARCH["arch_kwargs"], ARCH["_kw_requires_import"],
                                 1, 20, allow_init=True, deep_supervision=True)
    # make every tensor (norm weights and biases too) differ between the sites
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def test_fedavg_of_two_sites_equals_weighted_mean_of_state_dicts() -> None:
    from oarbench.train.aggregate import fedavg
    from oarbench.train.trainer import arrays_to_state, state_to_arrays

    net_a, net_b = _network(1), _network(2)
    sd_a = {k: v.clone() for k, v in net_a.state_dict().items()}
    sd_b = {k: v.clone() for k, v in net_b.state_dict().items()}
    w_a, w_b = state_to_arrays(net_a.state_dict()), state_to_arrays(net_b.state_dict())
    # the real nnU-Net state dict registers modules twice: fewer distinct tensors than keys
    assert len(w_a) < len(sd_a)
    n_a, n_b = 6, 9
    averaged = fedavg([(w_a, n_a), (w_b, n_b)])

    target = _network(3)
    target.load_state_dict(arrays_to_state(averaged, target))
    got = target.state_dict()
    assert set(got) == set(sd_a)
    for key in sd_a:
        expected = (n_a * sd_a[key].double() + n_b * sd_b[key].double()) / (n_a + n_b)
        torch.testing.assert_close(got[key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)
    # and not merely one site's weights
    some = next(k for k in sd_a if sd_a[k].dtype.is_floating_point and sd_a[k].numel() > 10)
    assert not torch.allclose(got[some], sd_a[some]) and not torch.allclose(got[some], sd_b[some])


def test_fedavg_equal_counts_is_plain_mean_and_order_free() -> None:
    from oarbench.train.aggregate import fedavg
    from oarbench.train.trainer import state_to_arrays

    net_a, net_b = _network(4), _network(5)
    w_a, w_b = state_to_arrays(net_a.state_dict()), state_to_arrays(net_b.state_dict())
    ab, ba = fedavg([(w_a, 5), (w_b, 5)]), fedavg([(w_b, 5), (w_a, 5)])
    sd_a, sd_b = net_a.state_dict(), net_b.state_dict()
    for key, arr in ab.items():
        mean = ((sd_a[key].double() + sd_b[key].double()) / 2).numpy()
        assert abs(arr.astype("float64") - mean).max() <= 1e-6 * (abs(mean).max() + 1)
        assert (arr == ba[key]).all()
