"""Packed layout of a prompt forest (segments in DFS preorder).

`build_forest_layout` runs the C++ builder from the extension when present,
and the pure-Python twin below otherwise; the tests check they agree.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from ..ops.extension import _C, reference_forced
from ..errors import ForestError, InvalidTypeError

# The deepest parent chain either builder accepts: csrc/tree_index.h's kMaxDepth
# (the kernels' per-row walk keeps one range per ancestor).
MAX_DEPTH = 128


def _integers(values: Sequence, what: str, segment: int | None = None) -> list[int]:
    """The values as ints; a non-integral one (0.7, "1") is refused, not truncated."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(operator.index(v))
        except TypeError:
            where = f"segment {i}" if segment is None else f"segment {segment}, token {i}"
            raise ForestError(f"{where}: {what} must be an integer, got {v!r}"
                              f" [segment={i if segment is None else segment}]") from None
    return out


def encode_vocab_source(vocab_id: int) -> int:
    """Token source code for a frozen vocabulary id (context rows are >= 0)."""
    return -(vocab_id + 1)


@dataclass
class ForestLayout:
    """Index tensors of a packed forest (int64, all on one device).

    segment_table:  [S, 4] (offset, length, parent, subtree_end), packed order
    packed_to_input: [S] caller's segment id of each packed segment
    input_to_packed: [S] packed index of each caller's segment
    token_segment, token_position, token_ctx_row, token_vocab_id: [T]
    """

    segment_table: torch.Tensor
    packed_to_input: torch.Tensor
    input_to_packed: torch.Tensor
    token_segment: torch.Tensor
    token_position: torch.Tensor
    token_ctx_row: torch.Tensor
    token_vocab_id: torch.Tensor
    max_path_tokens: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_segment.numel())

    @property
    def num_segments(self) -> int:
        return int(self.segment_table.shape[0])

    def to(self, device: torch.device | str) -> "ForestLayout":
        """The same layout on `device` (its tensors are int64 indices: a dtype is refused)."""
        check_device_arg(device, "ForestLayout")
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        with torch.inference_mode(False):  # see build_forest_layout
            return ForestLayout(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def check_device_arg(device, what: str) -> None:
    if not isinstance(device, (str, torch.device, int)):
        raise InvalidTypeError(f"{what}.to takes a device (its tensors are int64 indices, not cast), "
                               f"got {device!r}")


def build_forest_layout(parents: Sequence[int], sources: Sequence[Sequence[int]],
                        max_path_tokens: int) -> ForestLayout:
    """Pack segments (parent ids, token sources) into DFS preorder.

    Children are visited in increasing id. Raises ForestError when a parent is
    invalid, parents form a cycle, a segment is empty, or a path holds more than
    `max_path_tokens` tokens.
    """
    with torch.inference_mode(False):
        # normal tensors even under torch.inference_mode(): the fused attention
        # caches its block plan per segment table by version counter, which an
        # inference tensor lacks (it would be re-planned on every call, on CUDA
        # with a device-to-host copy per layer)
        return _build_forest_layout(parents, sources, max_path_tokens)


def _build_forest_layout(parents: Sequence[int], sources: Sequence[Sequence[int]],
                         max_path_tokens: int) -> ForestLayout:
    parents = _integers(parents, "its parent")
    sources = [_integers(src, "a token source", segment=i) for i, src in enumerate(sources)]
    if _C is not None and not reference_forced():
        try:
            d = _C.build_forest_layout(parents, sources, int(max_path_tokens))
        except ValueError as exc:  # the builder's ForestLayoutError, naming the segment
            raise ForestError(str(exc)) from None
        return ForestLayout(**d)
    return build_forest_layout_python(parents, sources, max_path_tokens)


def build_forest_layout_python(parents: Sequence[int], sources: Sequence[Sequence[int]],
                               max_path_tokens: int) -> ForestLayout:
    """Pure-Python twin of the C++ builder (fallback and test oracle)."""
    parents = _integers(parents, "its parent")
    sources = [_integers(src, "a token source", segment=i) for i, src in enumerate(sources)]
    n = len(parents)
    if len(sources) != n:
        raise ForestError("parents and sources must have the same length")
    children: list[list[int]] = [[] for _ in range(n)]
    roots = []
    for i, p in enumerate(parents):
        if len(sources[i]) == 0:
            raise ForestError(f"segment {i} has no tokens [segment={i}]")
        if p == -1:
            roots.append(i)
        elif not 0 <= p < n or p == i:
            raise ForestError(f"segment {i} has invalid parent {p} [segment={i}]")
        else:
            children[p].append(i)
    order: list[int] = []
    start = [0] * n
    depth = [0] * n
    stack = roots[::-1]
    longest = 0
    while stack:
        s = stack.pop()
        p = parents[s]
        start[s] = 0 if p < 0 else start[p] + len(sources[p])
        depth[s] = 1 if p < 0 else depth[p] + 1
        end = start[s] + len(sources[s])
        if end > max_path_tokens:
            raise ForestError(f"segment {s} ends at path position {end} > limit {max_path_tokens} [segment={s}]")
        if depth[s] > MAX_DEPTH:
            raise ForestError(f"segment {s} is deeper than {MAX_DEPTH} [segment={s}]")
        longest = max(longest, end)
        order.append(s)
        stack.extend(reversed(children[s]))
    if len(order) != n:
        missing = sorted(set(range(n)) - set(order))[0]
        raise ForestError(f"segment {missing} is not reachable from a root (cycle in parents) [segment={missing}]")
    input_to_packed = [0] * n
    for ps, s in enumerate(order):
        input_to_packed[s] = ps
    table = [[0, 0, -1, 0] for _ in range(n)]
    tok_seg, tok_pos, tok_ctx, tok_vocab = [], [], [], []
    offset = 0
    for ps, s in enumerate(order):
        src = sources[s]
        table[ps][0:3] = [offset, len(src), -1 if parents[s] < 0 else input_to_packed[parents[s]]]
        for j, code in enumerate(src):
            tok_seg.append(ps)
            tok_pos.append(start[s] + j)
            tok_ctx.append(code if code >= 0 else -1)
            tok_vocab.append(-1 if code >= 0 else -code - 1)
        offset += len(src)
    for ps in range(n - 1, -1, -1):
        row = table[ps]
        row[3] = max(row[3], row[0] + row[1])
        if row[2] >= 0:
            table[row[2]][3] = max(table[row[2]][3], row[3])
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return ForestLayout(
        segment_table=as_long(table).view(n, 4),
        packed_to_input=as_long(order),
        input_to_packed=as_long(input_to_packed),
        token_segment=as_long(tok_seg),
        token_position=as_long(tok_pos),
        token_ctx_row=as_long(tok_ctx),
        token_vocab_id=as_long(tok_vocab),
        max_path_tokens=longest,
    )
