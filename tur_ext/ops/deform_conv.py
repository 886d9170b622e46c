"""Modulated deformable convolution (DCNv2): ``deform_conv2d``, the Python face of ``torch.ops.tur.deform_conv2d``,
with its autograd formula (the ``tur::deform_conv2d_backward`` op) and fake kernels for torch.compile / export.

Semantics are torchvision's (and mmcv's): groups = C_in / weight.shape[1], offset groups =
offset.shape[1] / (2*kh*kw); for offset group g and kernel point k = i*kw + j, offset channel g*2*kh*kw + 2k is
the displacement along H, + 1 along W, and mask channel g*kh*kw + k multiplies the sample. A tap with
h <= -1, h >= H, w <= -1 or w >= W contributes 0, otherwise bilinear interpolation with corners outside the image
counted as 0.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

OP_NAME = "tur::deform_conv2d"
BACKWARD_OP_NAME = "tur::deform_conv2d_backward"

IntPair = Union[int, Sequence[int]]
_REGISTERED = False


def _pair(value: IntPair, name: str) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return [int(value[0]), int(value[1])]
    raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")


def require_compiled() -> None:
    """RuntimeError unless the compiled extension registered ``torch.ops.tur.deform_conv2d``."""
    if not _REGISTERED:
        raise RuntimeError(
            "deform_conv2d needs the compiled extension tur_ext._C (it has no pure-PyTorch fallback); build it with "
            "`pip install --no-build-isolation -e .`"
        )


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DCNv2 of ``input`` (B, C_in, H, W) with ``offset`` (B, 2*og*kh*kw, H_out, W_out), ``weight``
    (C_out, C_in/groups, kh, kw), optional ``bias`` (C_out,) and ``mask`` (B, og*kh*kw, H_out, W_out; None = ones).
    Returns (B, C_out, H_out, W_out). float16/bfloat16 are computed in float32. Differentiable in all tensors."""
    require_compiled()
    for name, t in (("input", input), ("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    return torch.ops.tur.deform_conv2d(
        input, offset, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
        mask,
    )


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake_forward(input, offset, weight, bias, stride, padding, dilation, mask):
    torch._check(input.dim() == 4, lambda: f"input: expected a 4-D tensor, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"weight: expected a 4-D tensor, got {weight.dim()}-D")
    B, H, W = input.shape[0], input.shape[2], input.shape[3]
    kh, kw = weight.shape[2], weight.shape[3]
    Ho = _out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, kw, stride[1], padding[1], dilation[1])
    return input.new_empty((B, weight.shape[0], Ho, Wo))


def _fake_backward(grad_out, input, offset, weight, mask, stride, padding, dilation):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty((weight.shape[0],)),
        torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else input.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, offset, weight, bias, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "tur.deform_conv2d does not support double backward (create_graph=True): its backward op is not "
            "itself differentiable"
        )
    input, offset, weight, mask = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    g_in, g_off, g_w, g_b, g_mask = torch.ops.tur.deform_conv2d_backward(
        grad_out, input, offset, weight, mask, stride, padding, dilation
    )
    return (
        g_in,
        g_off,
        g_w,
        g_b if ctx.has_bias else None,
        None,
        None,
        None,
        g_mask if mask is not None else None,
    )


#: ONNX's DeformConv (same offset/mask layout and sampling as this op) appeared in opset 19.
ONNX_OPSET = 19
_ONNX_REGISTERED = False


def _onnx_symbolic(g, input, offset, weight, bias, stride, padding, dilation, mask):
    """``tur::deform_conv2d`` as ONNX ``DeformConv`` for torch's TorchScript-based ONNX exporter. Channel counts
    come from the traced shapes (weights and the offset/mask convs are static), so groups and offset groups are
    fixed attributes; batch, H and W stay dynamic."""
    from torch.onnx import symbolic_helper as sh

    c_in = sh._get_tensor_sizes(input)[1]
    c_out, c_per_group, kh, kw = sh._get_tensor_sizes(weight)
    offset_channels = sh._get_tensor_sizes(offset)[1]
    if None in (c_in, c_per_group, kh, kw, offset_channels):
        raise RuntimeError("deform_conv2d: ONNX export needs static channel counts and kernel size")
    pad = sh._maybe_get_const(padding, "is")
    inputs = [input, weight, offset]
    if not sh._is_none(mask):
        inputs.append(bias if not sh._is_none(bias) else g.op("Constant", value_t=torch.zeros(c_out)))
        inputs.append(mask)
    elif not sh._is_none(bias):
        inputs.append(bias)
    return g.op("DeformConv", *inputs, kernel_shape_i=[kh, kw], strides_i=sh._maybe_get_const(stride, "is"),
                pads_i=[pad[0], pad[1], pad[0], pad[1]], dilations_i=sh._maybe_get_const(dilation, "is"),
                group_i=c_in // c_per_group, offset_group_i=offset_channels // (2 * kh * kw))


def register_onnx_symbolic() -> None:
    """Teach torch's TorchScript-based ONNX exporter the op (ONNX ``DeformConv``, opset >= :data:`ONNX_OPSET`)."""
    global _ONNX_REGISTERED
    if not _ONNX_REGISTERED:
        torch.onnx.register_custom_op_symbolic(OP_NAME, _onnx_symbolic, ONNX_OPSET)
        _ONNX_REGISTERED = True


def register() -> None:
    """Registers the fake kernels and the autograd formula (called once, when the compiled extension loaded)."""
    torch.library.register_fake(OP_NAME)(_fake_forward)
    torch.library.register_fake(BACKWARD_OP_NAME)(_fake_backward)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    global _REGISTERED
    _REGISTERED = True
