"""nnU-Net's PlainConvUNet architecture entry as its plans write it, for the tests that build small networks."""

from __future__ import annotations

from typing import Any


def plain_conv_unet(features: list[int], *, dim: int = 2, convs: int = 2) -> dict[str, Any]:
    """``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` of a U-Net with ``features`` per stage,
    3-wide kernels, stride 2 below the first stage and ``convs`` convolutions per stage (instance norm,
    leaky ReLU), in 2D or 3D."""
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(features),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * n,
            "strides": [[1] * dim] + [[2] * dim] * (n - 1),
            "n_conv_per_stage": [convs] * n,
            "n_conv_per_stage_decoder": [convs] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
