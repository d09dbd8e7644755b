"""Check that a (dtype, device) pair can run before any work starts.

Loading 135M parameters and then failing inside the first matmul with "addmm_impl_cpu_ not implemented
for 'Half'" wastes minutes and names neither the setting nor the fix; a tiny probe in that dtype on that
device fails in milliseconds, and the error below says which argument to change.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class UnsupportedDtypeError(ValueError):
    """The requested dtype cannot run on the requested device."""


def resolve_dtype(dtype) -> torch.dtype:
    """A floating-point `torch.dtype` from a dtype or its name; raises `ValueError` naming the accepted ones."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use one of {sorted(DTYPES)}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")


def resolve_device(device) -> torch.device:
    """A `torch.device` from a name or device; raises `ValueError` for an unknown one."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use 'cpu', 'cuda' or 'cuda:N'") from None


def probe(dtype: torch.dtype, device: torch.device) -> None:
    """The ops every causal LM runs: a linear layer, a norm, a softmax and a reduction."""
    x = torch.ones(2, 8, dtype=dtype, device=device)
    w = torch.ones(8, 8, dtype=dtype, device=device)
    y = torch.nn.functional.linear(x, w)
    y = torch.nn.functional.layer_norm(y, (8,))
    total = torch.softmax(y, dim=-1).sum()
    if device.type != "meta":  # meta tensors have no value to read
        total.item()


def check_runnable(dtype, device) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) resolved, or UnsupportedDtypeError naming both and what to use instead."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    try:
        probe(dtype, device)
    except (RuntimeError, AssertionError, NotImplementedError) as err:
        hint = "use --device cpu (device='cpu') or a device this torch build supports"
        if dtype != torch.float32:
            hint = "use --dtype float32 (dtype=torch.float32)" + (" or --device cpu" if device.type != "cpu" else "")
        raise UnsupportedDtypeError(
            f"dtype {str(dtype).replace('torch.', '')} cannot run on device {device}: "
            f"{str(err).splitlines()[0]}. Nothing was loaded; {hint}.") from None
    return dtype, device
