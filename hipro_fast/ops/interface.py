"""Python interface to the fused ops (torch.ops.hipro_fast.*).

Each op has autograd and fake (meta) registrations so it works under
torch.compile, and a plain-PyTorch reference in `hipro_fast.ops.reference` used
when the compiled kernels are unavailable for the tensors' device.

Packed-forest conventions (see csrc/tree_index.h):
  T tokens in DFS preorder of S segments; segment_table int64 [S, 4] rows of
  (offset, length, parent, subtree_end); token_segment int64 [T].
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.autograd.forward_ad as fwAD

from . import reference
from .extension import _C, fused_available, warn_fallback
from ..errors import DeviceMismatchError, ExtensionUnavailableError, InvalidInputError, UnsupportedAutogradError

__all__ = ["assemble_forest", "tree_attention", "pool_eos", "attention_block_min_pairs",
           "set_attention_block_min_pairs", "attention_block_grouping", "set_attention_block_grouping",
           "attention_knobs"]

_GROUPING = ("never", "auto", "always")


def assemble_forest(
    ctx_table: torch.Tensor,
    token_embedding: torch.Tensor,
    positional_embedding: torch.Tensor,
    token_ctx_row: torch.Tensor,
    token_vocab_id: torch.Tensor,
    token_position: torch.Tensor,
) -> torch.Tensor:
    """Write the packed forest input in one pass.

    Args:
        ctx_table: [R, W] every node's context rows, concatenated (learnable).
        token_embedding: [V, W] frozen vocabulary embeddings.
        positional_embedding: [L, W] frozen positional embeddings.
        token_ctx_row: [T] int64, context row read by token t, or -1.
        token_vocab_id: [T] int64, vocabulary id read by token t when its ctx row is -1.
        token_position: [T] int64, absolute position of token t along its prompt.
    Returns:
        [T, W] in ctx_table's dtype; gradients flow to ctx_table only.
    """
    _refuse_forward_ad("assemble_forest", ctx_table, token_embedding, positional_embedding)
    dtype = ctx_table.dtype
    token_embedding = token_embedding.to(dtype)
    positional_embedding = positional_embedding.to(dtype)
    if fused_available(ctx_table.device):
        return _call_op("assemble_forest", ctx_table, token_embedding, positional_embedding,
                        token_ctx_row, token_vocab_id, token_position)
    warn_fallback(ctx_table.device.type)
    return reference.assemble_forest(ctx_table, token_embedding, positional_embedding,
                                     token_ctx_row, token_vocab_id, token_position)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_table: torch.Tensor,
    token_segment: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each packed token over its ancestor segments and, causally, its own.

    Args:
        q, k, v: [T, H, D] fp32, fp64, bf16 or fp16; rows may be strided (e.g. slices of
            a packed [T, 3, H, D] qkv), each [H, D] block contiguous, else a copy is made.
        segment_table: [S, 4] int64, see module docstring.
        token_segment: [T] int64.
        scale: softmax scale, usually D ** -0.5.
    Returns:
        [T, H, D] in q's dtype; softmax and accumulation in fp32 (fp64 for fp64).

    The fused op plans its segment blocks once per table and caches the plan
    (csrc/attention_blocks.h). A CPU table is compared by content; a CUDA table
    is recognised by storage and version counter, so treat a CUDA segment table
    as immutable: an in-place write that bypasses autograd's version counter
    (through `.data`, DLPack or a raw kernel) would reuse the old plan. Layouts
    from build_forest_layout are never written.
    """
    _refuse_forward_ad("tree_attention", q, k, v)
    if fused_available(q.device):
        out, _ = _call_op("tree_attention", _row_strided(q), _row_strided(k), _row_strided(v),
                          segment_table, token_segment, float(scale))
        return out
    warn_fallback(q.device.type)
    return reference.tree_attention(q, k, v, segment_table, token_segment, scale)


def pool_eos(
    x: torch.Tensor,
    eos_index: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    projection: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """EOS gather + LayerNorm + text projection + L2 normalisation.

    Args:
        x: [T, W] final hidden states of the packed forest.
        eos_index: [P] int64 packed index of each prompt's EOS token.
        ln_weight, ln_bias: [W] the final LayerNorm's affine parameters.
        projection: [W, E] text projection.
        eps: the LayerNorm epsilon.
    Returns:
        [P, E] fp32 (fp64 for fp64 input) unit-norm text features.
    """
    _refuse_forward_ad("pool_eos", x, ln_weight, ln_bias, projection)
    if fused_available(x.device):
        features, _, _, _ = _call_op("pool_eos", x, eos_index, ln_weight, ln_bias, projection, float(eps))
        return features
    warn_fallback(x.device.type)
    return reference.pool_eos(x, eos_index, ln_weight, ln_bias, projection, eps)


def attention_block_min_pairs() -> int:
    """Tree attention (CPU and CUDA): a segment whose (descendant queries x keys)
    block holds at least this many pairs attends through batched GEMMs; smaller
    ones stay in the per-row kernels (see csrc/attention_blocks.h). Default 256."""
    if _C is None:
        raise ExtensionUnavailableError("the compiled extension is not available (hipro_fast.build_info())")
    return int(_C.attention_block_min_pairs())


def set_attention_block_min_pairs(min_pairs: int) -> None:
    """Set the threshold above (process-wide): 0 sends every segment with
    descendants through GEMMs, a huge value none. Results agree to rounding
    either way; this is a performance knob (and a test hook)."""
    if _C is None:
        raise ExtensionUnavailableError("the compiled extension is not available (hipro_fast.build_info())")
    if int(min_pairs) < 0:
        raise InvalidInputError(f"min_pairs must be >= 0, got {min_pairs}")
    _C.set_attention_block_min_pairs(int(min_pairs))


def attention_block_grouping() -> str:
    """Whether same-depth GEMM blocks are batched into one gather + bmm per group
    (csrc/attention_blocks.h): "auto" (default: on CUDA, not on the CPU), "always"
    or "never"."""
    if _C is None:
        raise ExtensionUnavailableError("the compiled extension is not available (hipro_fast.build_info())")
    return _GROUPING[int(_C.attention_block_grouping())]


def set_attention_block_grouping(mode: str) -> None:
    """Set it (process-wide). Results agree to rounding either way; a performance
    knob and a test hook (the CPU tests run both ways)."""
    if _C is None:
        raise ExtensionUnavailableError("the compiled extension is not available (hipro_fast.build_info())")
    if mode not in _GROUPING:
        raise InvalidInputError(f"grouping must be one of {_GROUPING}, got {mode!r}")
    _C.set_attention_block_grouping(_GROUPING.index(mode))


@contextlib.contextmanager
def attention_knobs(min_pairs: int | None = None, grouping: str | None = None) -> Iterator[None]:
    """The block threshold and grouping above, set for the duration of a `with`
    (None: left as is) and restored after: how the tests and the benchmark's
    profile run one decomposition."""
    before = attention_block_min_pairs(), attention_block_grouping()
    if min_pairs is not None:
        set_attention_block_min_pairs(min_pairs)
    if grouping is not None:
        set_attention_block_grouping(grouping)
    try:
        yield
    finally:
        set_attention_block_min_pairs(before[0])
        set_attention_block_grouping(before[1])


def _row_strided(x: torch.Tensor) -> torch.Tensor:
    """x itself when each [H, D] row block is contiguous (slices of a packed qkv are),
    else a copy with standard strides (not .contiguous(): a tensor with a size-1
    dimension counts as contiguous whatever that dimension's stride)."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _refuse_forward_ad(op: str, *tensors: torch.Tensor) -> None:
    """The ops have reverse-mode formulas only: a forward-mode tangent (torch.func.jvp,
    torch.autograd.forward_ad) would otherwise be dropped without a word."""
    if torch.compiler.is_compiling():
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise UnsupportedAutogradError(f"hipro_fast.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
                                  "is not supported; use reverse mode (loss.backward() or torch.autograd.grad)")


def _call_op(op: str, *args):
    """torch.ops.hipro_fast.<op>(*args), with torch.func's gradient transforms
    (grad, jacrev, hessian) refused by name: register_autograd's formulas run
    under loss.backward() / torch.autograd.grad and torch.vmap, but functorch
    cannot transform them and says so only in its own terms."""
    try:
        return getattr(torch.ops.hipro_fast, op)(*args)
    except RuntimeError as err:
        if "functorch" in str(err) and "setup_context" in str(err):
            raise UnsupportedAutogradError(
                f"hipro_fast.{op}: torch.func.grad / jacrev / hessian are not supported; use reverse "
                "mode (loss.backward() or torch.autograd.grad; torch.vmap works)") from err
        raise


def _fake_same_device(op: str, **tensors: torch.Tensor) -> None:
    """The fake kernel runs for every call with a meta argument, also when the others
    are real tensors, and would return uninitialised memory on their device: the
    real kernels' device check, for the fakes (under torch.compile every fake
    argument sits on the one device, and this passes)."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.device != ref.device:
            raise DeviceMismatchError(f"hipro_fast.{op}: {name} is on {t.device}, {first} on {ref.device}; "
                                      "all arguments must be on one device")


def _refuse_double_backward(op: str) -> None:
    """Called first in each backward: with create_graph=True grad mode is on there,
    and the *_backward ops have no derivative of their own, so a second-order
    gradient would come out zero without an error."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise UnsupportedAutogradError(f"hipro_fast.{op}: double backward (create_graph=True, gradients of "
                                  "gradients) is not supported")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The ops' accumulation dtype (fp64 for fp64, else fp32): the Python side of
    csrc/acc_type.h, for the fake registrations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register() -> None:
    """Fake and autograd registrations for the compiled ops."""

    @torch.library.register_fake("hipro_fast::assemble_forest")
    def _(ctx_table, token_embedding, positional_embedding, token_ctx_row, token_vocab_id,
          token_position):
        _fake_same_device("assemble_forest", ctx_table=ctx_table, token_embedding=token_embedding,
                          positional_embedding=positional_embedding, token_ctx_row=token_ctx_row,
                          token_vocab_id=token_vocab_id, token_position=token_position)
        return ctx_table.new_empty((token_ctx_row.shape[0], ctx_table.shape[1]))

    @torch.library.register_fake("hipro_fast::assemble_forest_backward")
    def _(grad_out, token_ctx_row, num_ctx_rows):
        _fake_same_device("assemble_forest_backward", grad_out=grad_out, token_ctx_row=token_ctx_row)
        return grad_out.new_empty((num_ctx_rows, grad_out.shape[1]))

    def assemble_setup(ctx, inputs, output):
        ctx_table, token_embedding, positional_embedding, token_ctx_row, token_vocab_id, token_position = inputs
        ctx.save_for_backward(token_ctx_row, token_vocab_id, token_position)
        ctx.num_ctx_rows = ctx_table.shape[0]
        ctx.vocab_shape = token_embedding.shape
        ctx.pos_shape = positional_embedding.shape

    def assemble_backward(ctx, grad_out):
        _refuse_double_backward("assemble_forest")
        token_ctx_row, token_vocab_id, token_position = ctx.saved_tensors
        grads = [None] * 6
        if ctx.needs_input_grad[0]:
            grads[0] = torch.ops.hipro_fast.assemble_forest_backward(
                grad_out, token_ctx_row, ctx.num_ctx_rows)
        # Frozen in HiPro, but exact when a caller does train them.
        if ctx.needs_input_grad[1]:
            from_vocab = token_ctx_row < 0
            grads[1] = grad_out.new_zeros(ctx.vocab_shape).index_add_(
                0, token_vocab_id[from_vocab], grad_out[from_vocab])
        if ctx.needs_input_grad[2]:
            grads[2] = grad_out.new_zeros(ctx.pos_shape).index_add_(0, token_position, grad_out)
        return tuple(grads)

    torch.library.register_autograd(
        "hipro_fast::assemble_forest", assemble_backward, setup_context=assemble_setup)

    @torch.library.register_fake("hipro_fast::tree_attention")
    def _(q, k, v, segment_table, token_segment, scale):
        _fake_same_device("tree_attention", q=q, k=k, v=v, segment_table=segment_table,
                          token_segment=token_segment)
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=_acc_dtype(q.dtype))

    @torch.library.register_fake("hipro_fast::tree_attention_backward")
    def _(grad_out, q, k, v, out, lse, segment_table, token_segment, scale):
        _fake_same_device("tree_attention_backward", grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse,
                          segment_table=segment_table, token_segment=token_segment)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def attention_setup(ctx, inputs, output):
        q, k, v, segment_table, token_segment, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # softmax statistics for the backward, not a differentiable output
        ctx.save_for_backward(q, k, v, out, lse, segment_table, token_segment)
        ctx.scale = scale

    def attention_backward(ctx, grad_out, grad_lse):
        _refuse_double_backward("tree_attention")
        q, k, v, out, lse, segment_table, token_segment = ctx.saved_tensors
        dq, dk, dv = torch.ops.hipro_fast.tree_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, segment_table, token_segment, ctx.scale)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(
        "hipro_fast::tree_attention", attention_backward, setup_context=attention_setup)

    @torch.library.register_fake("hipro_fast::pool_eos")
    def _(x, eos_index, ln_weight, ln_bias, projection, eps):
        _fake_same_device("pool_eos", x=x, eos_index=eos_index, ln_weight=ln_weight, ln_bias=ln_bias,
                          projection=projection)
        acc = _acc_dtype(x.dtype)
        P, W, E = eos_index.shape[0], x.shape[1], projection.shape[1]
        return (x.new_empty((P, E), dtype=acc), x.new_empty((P, W), dtype=acc),
                x.new_empty((P,), dtype=acc), x.new_empty((P,), dtype=acc))

    @torch.library.register_fake("hipro_fast::pool_eos_backward")
    def _(grad_features, features, x_hat, rstd, proj_norm, ln_weight, projection, eos_index,
          num_tokens, x_dtype):
        _fake_same_device("pool_eos_backward", x_hat=x_hat, grad_features=grad_features, features=features,
                          rstd=rstd, proj_norm=proj_norm, ln_weight=ln_weight, projection=projection,
                          eos_index=eos_index)
        return x_hat.new_empty((num_tokens, x_hat.shape[1]), dtype=x_dtype)

    def pool_setup(ctx, inputs, output):
        x, eos_index, ln_weight, ln_bias, projection, eps = inputs
        features, x_hat, rstd, proj_norm = output
        ctx.mark_non_differentiable(x_hat, rstd, proj_norm)  # saved statistics for the backward
        ctx.save_for_backward(features, x_hat, rstd, proj_norm, ln_weight, ln_bias, projection,
                              eos_index)
        ctx.num_tokens = x.shape[0]
        ctx.x_dtype = x.dtype

    def pool_backward(ctx, grad_features, _g_xhat, _g_rstd, _g_norm):
        _refuse_double_backward("pool_eos")
        features, x_hat, rstd, proj_norm, ln_weight, ln_bias, projection, eos_index = ctx.saved_tensors
        grads = [None] * 6
        if grad_features is None:
            return tuple(grads)
        if ctx.needs_input_grad[0]:
            grads[0] = torch.ops.hipro_fast.pool_eos_backward(
                grad_features, features, x_hat, rstd, proj_norm, ln_weight, projection,
                eos_index, ctx.num_tokens, ctx.x_dtype)
        if any(ctx.needs_input_grad[2:5]):
            # Frozen in HiPro; computed from the saved activations when asked for,
            # in the op's precision also inside autocast (as the C++ backward).
            return _pool_param_grads(ctx, grads, grad_features, features, x_hat, proj_norm, ln_weight, ln_bias,
                                     projection)
        return tuple(grads)

    def _pool_param_grads(ctx, grads, grad_features, features, x_hat, proj_norm, ln_weight, ln_bias, projection):
        with torch.autocast(x_hat.device.type, enabled=False):
            acc = x_hat.dtype
            g = grad_features.to(acc)
            dz = (g - features * (g * features).sum(1, keepdim=True)) / proj_norm.clamp_min(1e-12).unsqueeze(1)
            y = x_hat * ln_weight.to(acc) + ln_bias.to(acc)
            dy = dz @ projection.to(acc).t()
            if ctx.needs_input_grad[2]:
                grads[2] = (dy * x_hat).sum(0).to(ln_weight.dtype)
            if ctx.needs_input_grad[3]:
                grads[3] = dy.sum(0).to(ln_bias.dtype)
            if ctx.needs_input_grad[4]:
                grads[4] = (y.t() @ dz).to(projection.dtype)
        return tuple(grads)

    torch.library.register_autograd(
        "hipro_fast::pool_eos", pool_backward, setup_context=pool_setup)


if _C is not None:
    _register()
