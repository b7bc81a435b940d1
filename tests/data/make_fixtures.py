"""Regenerate the fixtures in this directory (needs torch): python tests/data/make_fixtures.py"""
from pathlib import Path

import torch

HERE = Path(__file__).parent


def tensors():
    k = torch.arange(12)
    base = torch.arange(10, dtype=torch.int64)
    wide = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "float32": (k / 8 - 0.5).float().reshape(3, 4),
        "bfloat16": (k / 8 - 0.5).to(torch.bfloat16).reshape(3, 4),
        "float16": (k / 8 - 0.5).half().reshape(3, 4),
        "float8_e4m3fn": (k / 8 - 0.5).to(torch.float8_e4m3fn).reshape(3, 4),
        "int8": (k - 6).to(torch.int8).reshape(3, 4),
        "int32": (k * 1000003 - 6000000).int().reshape(3, 4),
        "int64": (k * 2 ** 40 - 3).reshape(3, 4),
        "bool": (k % 3 == 0).reshape(3, 4),
        "uint8": (k * 20 + 10).to(torch.uint8).reshape(3, 4),
        "view": wide[1:, ::2],                       # offset 6, strides (6, 2)
        "transposed": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
        "scalar": torch.tensor(1027, dtype=torch.int32),
        "head": base[:5], "tail": base[5:],          # one storage, two views
    }


def rms_norm_case(T=3, D=64, eps=1e-6):
    torch.manual_seed(0)
    x = torch.randn(T, D).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(D)).to(torch.bfloat16)
    xf = x.float()
    x_normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * norm_w.float())
    return {"in": {"x": x, "norm_w": norm_w}, "out": {"x_normed": x_normed.to(torch.bfloat16)}}


if __name__ == "__main__":
    torch.save(tensors(), HERE / "tensors.pt")
    for sub, ts in rms_norm_case().items():
        (HERE / "rms_norm" / sub).mkdir(parents=True, exist_ok=True)
        for name, t in ts.items():
            torch.save(t, HERE / "rms_norm" / sub / f"{name}.pt")
