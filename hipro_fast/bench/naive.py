"""Baseline text-side training steps that the forest is timed against (no forest engine).

Every baseline runs the frozen open_clip text tower on full prompts built the
CoOp way: the token embeddings of the tokenised f"{name}." prompt (SOS first,
EOS and zero padding after) with the context rows spliced in after SOS. The
prompt semantics are those of `hipro_fast.engine.prompt_forest` (concat / mean).

  * naive     -- one [n_classes, L] batch per prompt set (per task in `concat`,
                 per (task, path node) in `mean`), through `TextTower.encode_embedded`
                 (open_clip's own modules, full context length L with the dense
                 causal mask); one loss, one backward.
  * padded    -- every distinct prompt of every task in one [P, L] batch.
  * truncated -- as padded, cut after the longest EOS (the mask cut to match);
                 exact because the tower is causal and pools the EOS token.

A step whose autograd graph would not fit `max_graph_bytes` is split into
micro-batches with one backward each (gradient accumulation). The split only
separates independent loss terms (tasks for `naive`; groups of prompts that
no (task, class) term couples for `padded`/`truncated`), so the gradient is
the same; `BaselineStep.micro_batches` says how many were used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..engine.prompt_forest import class_suffix_tokens


@dataclass
class PromptSpec:
    """The distinct prompts of a HiPro configuration, in the forest's prompt order.

    prompts: (ctx node path, suffix token ids incl. EOS) per distinct prompt.
    task_prompts: task -> int64 [C] (`concat`) or [len(path), C] (`mean`) prompt ids
        (the same ids `build_prompt_forest` assigns).
    sets: the CoOp-style prompt sets (task, node path, prompt id per class); one per
        task in `concat`, one per (task, path node) in `mean`.
    """

    combine: str
    context_length: int
    prompts: list[tuple[tuple[str, ...], tuple[int, ...]]]
    task_prompts: dict[str, torch.Tensor]
    sets: list[tuple[str, tuple[str, ...], list[int]]]
    node_ctx_rows: dict[str, tuple[int, int]]
    sot: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def ctx_count(self, nodes: Sequence[str]) -> int:
        return sum(self.node_ctx_rows[n][1] for n in nodes)

    def ctx_rows(self, nodes: Sequence[str]) -> list[int]:
        rows: list[int] = []
        for n in nodes:
            start, count = self.node_ctx_rows[n]
            rows.extend(range(start, start + count))
        return rows

    def eos_position(self, pid: int) -> int:
        nodes, suffix = self.prompts[pid]
        return self.ctx_count(nodes) + len(suffix)  # SOS at 0

    def prompt_length(self, pid: int) -> int:
        return self.eos_position(pid) + 1


def enumerate_prompts(tokenizer, context_length: int, node_ctx_rows: Mapping[str, tuple[int, int]],
                      task_paths: Mapping[str, Sequence[str]],
                      task_classes: Mapping[str, Sequence[str]], combine: str) -> PromptSpec:
    """Distinct prompts and CoOp sets, numbered exactly as `build_prompt_forest` numbers them."""
    index: dict[tuple, int] = {}
    prompts: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    task_prompts: dict[str, torch.Tensor] = {}
    sets: list[tuple[str, tuple[str, ...], list[int]]] = []

    def pid(nodes: tuple[str, ...], suffix: tuple[int, ...]) -> int:
        key = (nodes, suffix)
        if key not in index:
            index[key] = len(prompts)
            prompts.append(key)
        return index[key]

    for task, path in task_paths.items():
        suffixes = [tuple(class_suffix_tokens(tokenizer, n)) for n in task_classes[task]]
        if combine == "concat":
            ids = [pid(tuple(path), s) for s in suffixes]
            sets.append((task, tuple(path), ids))
            task_prompts[task] = torch.tensor(ids, dtype=torch.long)
        else:
            rows = []
            for node in path:
                ids = [pid((node,), s) for s in suffixes]
                sets.append((task, (node,), ids))
                rows.append(ids)
            task_prompts[task] = torch.tensor(rows, dtype=torch.long)
    return PromptSpec(combine, context_length, prompts, task_prompts, sets, dict(node_ctx_rows),
                      int(tokenizer.sot_token_id))


def encode_truncated(tower, embedded: torch.Tensor, eos_position: torch.Tensor) -> torch.Tensor:
    """`TextTower.encode_embedded` on prompts cut to Lc = embedded.shape[1] tokens.

    Same open_clip modules; positional embedding and causal mask cut to Lc.
    """
    text = tower.text
    lc = embedded.shape[1]
    x = embedded + text.positional_embedding[:lc]
    x = text.transformer(x, attn_mask=text.attn_mask[:lc, :lc])
    x = text.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eos_position]
    return F.normalize((pooled @ tower.projection).float(), dim=-1)


def graph_bytes_estimate(tokens: int, seq_len: int, layers: int, width: int, heads: int) -> float:
    """Rough autograd-graph size of open_clip's text transformer on `tokens` tokens.

    ~11.5 W activations plus the H x seq attention map per token and layer, fp32.
    The 11.5 W term was calibrated on ViT-B-16 (fp32, CPU); the estimate only
    decides where a step is split into micro-batches, never what a step computes.
    """
    return float(tokens) * layers * (11.5 * width + heads * seq_len) * 4.0


@dataclass
class _Group:
    rows: torch.Tensor        # [n_ctx] context rows spliced after SOS
    suffix: torch.Tensor      # [n, Lb - 1 - n_ctx, W] frozen suffix embeddings (+ zero-token padding)
    eos: torch.Tensor         # [n] EOS positions

    def to(self, device) -> None:
        self.rows, self.suffix, self.eos = self.rows.to(device), self.suffix.to(device), self.eos.to(device)


@dataclass
class _Batch:
    groups: list[_Group]
    eos: torch.Tensor         # [p] EOS positions in batch order
    prompt_ids: torch.Tensor  # [p] global prompt id of each batch row
    # loss terms: (task, local prompt ids [C'] or [n_path, C'], class indices [C'])
    terms: list[tuple[str, torch.Tensor, torch.Tensor]]
    tokens: int

    def to(self, device) -> None:
        self.eos, self.prompt_ids = self.eos.to(device), self.prompt_ids.to(device)
        self.terms = [(t, local.to(device), cls.to(device)) for t, local, cls in self.terms]
        for g in self.groups:
            g.to(device)


@dataclass
class BaselineStep:
    """A baseline text-side step; `step()` runs forward + backward to the context table.

    Attributes set at build time: `tokens` (sequence tokens pushed through the
    transformer per step), `seq_len`, `key_tokens` (sum over queries of keys the
    dense masked attention computes: tokens * seq_len), `pooled` (EOS rows
    projected), `micro_batches` (backward calls per step).
    """

    name: str
    spec: PromptSpec
    tower: object
    weights: dict[str, torch.Tensor]
    batches: list[list[_Batch]] = field(default_factory=list)  # graphs (backward units) of batches
    seq_len: int = 0
    tokens: int = 0
    pooled: int = 0

    @property
    def key_tokens(self) -> int:
        return self.tokens * self.seq_len

    @property
    def micro_batches(self) -> int:
        return len(self.batches)

    def _all_batches(self) -> list[_Batch]:
        return [b for g in self.batches for b in g]

    def to(self, device) -> "BaselineStep":
        """Move the prebuilt index/embedding tensors and loss weights to `device` in place."""
        for b in self._all_batches():
            b.to(device)
        self.weights = {t: w.to(device) for t, w in self.weights.items()}
        return self

    def _embed(self, batch: _Batch, ctx_table: torch.Tensor, sos: torch.Tensor) -> torch.Tensor:
        parts = []
        for g in batch.groups:
            n = g.suffix.shape[0]
            ctx = ctx_table[g.rows].unsqueeze(0).expand(n, -1, -1)
            parts.append(torch.cat([sos.expand(n, 1, -1), ctx, g.suffix], dim=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _features(self, batch: _Batch, ctx_table: torch.Tensor) -> torch.Tensor:
        text = self.tower.text
        sos = text.token_embedding.weight[self.spec.sot].to(ctx_table.dtype).view(1, 1, -1)
        embedded = self._embed(batch, ctx_table, sos)
        if embedded.shape[1] == self.spec.context_length:
            return self.tower.encode_embedded(embedded, batch.eos)
        return encode_truncated(self.tower, embedded, batch.eos)

    def _term_features(self, feats: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if self.spec.combine == "concat":
            return feats[local]
        return F.normalize(feats[local].mean(0), dim=-1)

    def step(self, ctx_table: torch.Tensor, collect: bool = False, limit_graphs: int | None = None):
        """One training step; returns (loss, collected) where collected (when asked) holds
        per-prompt features {prompt id: [E]} as a [P, E] tensor with NaN rows for prompts
        not computed, and per-task features {task: [C, E]} (NaN rows likewise).

        limit_graphs: run only the first graphs (for extrapolated timings).
        """
        total = 0.0
        P = self.spec.num_prompts
        E = self.tower.projection.shape[1]
        pf = torch.full((P, E), float("nan"), device=ctx_table.device) if collect else None
        tf = {t: torch.full((ids.shape[-1], E), float("nan"), device=ctx_table.device)
              for t, ids in self.spec.task_prompts.items()} \
            if collect else None
        for graph in self.batches[:limit_graphs]:
            loss = None
            for batch in graph:
                feats = self._features(batch, ctx_table)
                for task, local, cls in batch.terms:
                    f = self._term_features(feats, local)
                    term = (f * self.weights[task][cls]).sum()
                    loss = term if loss is None else loss + term
                    if collect:
                        tf[task][cls] = f.detach().to(tf[task].dtype)
                if collect:
                    pf[batch.prompt_ids] = feats.detach().to(pf.dtype)
            loss.backward()
            total += float(loss.detach())
        return total, ({"prompt_features": pf, "task_features": tf} if collect else None)


def _suffix_embeddings(token_embedding: torch.Tensor, suffixes: Sequence[tuple[int, ...]],
                       length: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, length, W]: suffix tokens then zero-token padding (open_clip pads with id 0), cut to length."""
    ids = torch.zeros(len(suffixes), length, dtype=torch.long)
    for i, s in enumerate(suffixes):
        s = list(s)[:length]
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return token_embedding[ids].to(dtype).detach()


def _make_batch(spec: PromptSpec, token_embedding: torch.Tensor, pids: Sequence[int], seq_len: int,
                terms: list[tuple[str, torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> _Batch:
    """A batch of prompts `pids` (global ids), grouped by context path, padded/cut to seq_len."""
    by_path: dict[tuple[str, ...], list[int]] = {}
    for p in pids:
        by_path.setdefault(spec.prompts[p][0], []).append(p)
    groups, order = [], []
    for nodes, ps in by_path.items():
        n_ctx = spec.ctx_count(nodes)
        suffix = _suffix_embeddings(token_embedding, [spec.prompts[p][1] for p in ps],
                                    seq_len - 1 - n_ctx, dtype)
        eos = torch.tensor([spec.eos_position(p) for p in ps], dtype=torch.long)
        groups.append(_Group(torch.tensor(spec.ctx_rows(nodes), dtype=torch.long), suffix, eos))
        order.extend(ps)
    local = {p: i for i, p in enumerate(order)}
    remapped = [(t, torch.tensor([[local[int(p)] for p in row] for row in ids.view(-1, ids.shape[-1])],
                                 dtype=torch.long).view(ids.shape), cls) for t, ids, cls in terms]
    return _Batch(groups, torch.cat([g.eos for g in groups]), torch.tensor(order, dtype=torch.long),
                  remapped, len(order) * seq_len)


def build_naive(spec: PromptSpec, tower, weights: Mapping[str, torch.Tensor],
                max_graph_bytes: float = float("inf"), dtype=torch.float32) -> "NaiveStep":
    """CoOp-style: one full-length batch per prompt set, summed loss, one backward.

    Tasks are split into separate backward calls only when their joint graph would
    exceed max_graph_bytes (a task's sets never straddle two graphs).
    """
    cfg = tower.config
    L = spec.context_length
    emb = tower.text.token_embedding.weight
    per_task: dict[str, list[_Batch]] = {}
    for task, nodes, ids in spec.sets:
        # the set's own batch: rows follow the task's class order (duplicates kept, as CoOp would)
        suffix = _suffix_embeddings(emb, [spec.prompts[p][1] for p in ids], L - 1 - spec.ctx_count(nodes), dtype)
        eos = torch.tensor([spec.eos_position(p) for p in ids], dtype=torch.long)
        group = _Group(torch.tensor(spec.ctx_rows(nodes), dtype=torch.long), suffix, eos)
        per_task.setdefault(task, []).append(
            _Batch([group], eos, torch.tensor(ids, dtype=torch.long), [], len(ids) * L))
    graphs: list[list[tuple[str, list[_Batch]]]] = [[]]
    for task, batches in per_task.items():
        tokens = sum(b.tokens for _, bs in graphs[-1] for b in bs) + sum(b.tokens for b in batches)
        if graphs[-1] and graph_bytes_estimate(tokens, L, cfg.layers, cfg.width, cfg.heads) > max_graph_bytes:
            graphs.append([])
        graphs[-1].append((task, batches))
    step = NaiveStep("naive", spec, tower, dict(weights), seq_len=L)
    step.task_graphs = graphs
    step.tokens = sum(b.tokens for g in graphs for _, bs in g for b in bs)
    step.pooled = sum(b.eos.numel() for g in graphs for _, bs in g for b in bs)
    return step


@dataclass
class NaiveStep(BaselineStep):
    """CoOp-style loop: per task, one batch per prompt set through `encode_embedded`."""

    task_graphs: list = field(default_factory=list)

    @property
    def micro_batches(self) -> int:
        return len(self.task_graphs)

    def _all_batches(self) -> list[_Batch]:
        return [b for g in self.task_graphs for _, bs in g for b in bs]

    def step(self, ctx_table: torch.Tensor, collect: bool = False, limit_graphs: int | None = None):
        spec = self.spec
        P, E = spec.num_prompts, self.tower.projection.shape[1]
        pf = torch.full((P, E), float("nan"), device=ctx_table.device) if collect else None
        tf = {} if collect else None
        total = 0.0
        for graph in self.task_graphs[:limit_graphs]:
            loss = None
            for task, batches in graph:
                feats = [self._features(b, ctx_table) for b in batches]
                if spec.combine == "concat":
                    f = feats[0]
                else:
                    f = F.normalize(torch.stack(feats).mean(0), dim=-1)  # feats are unit-norm
                term = (f * self.weights[task]).sum()
                loss = term if loss is None else loss + term
                if collect:
                    tf[task] = f.detach()
                    for b, x in zip(batches, feats):
                        pf[b.prompt_ids] = x.detach()
            loss.backward()
            total += float(loss.detach())
        return total, ({"prompt_features": pf, "task_features": tf} if collect else None)


def _components(spec: PromptSpec) -> list[list[int]]:
    """Groups of prompts that (task, class) loss terms couple (union-find), in prompt order."""
    parent = list(range(spec.num_prompts))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for ids in spec.task_prompts.values():
        cols = ids.view(-1, ids.shape[-1])
        for c in range(cols.shape[1]):
            col = [int(p) for p in cols[:, c]]
            for p in col[1:]:
                parent[find(p)] = find(col[0])
    groups: dict[int, list[int]] = {}
    for p in range(spec.num_prompts):
        groups.setdefault(find(p), []).append(p)
    return list(groups.values())


def build_batched(spec: PromptSpec, tower, weights: Mapping[str, torch.Tensor], truncate: bool,
                  max_graph_bytes: float = float("inf"), dtype=torch.float32,
                  max_prompts: int | None = None) -> BaselineStep:
    """padded-batched (truncate=False) or truncated (truncate=True): all distinct prompts in one batch.

    max_prompts: only the first prompts (with the terms they complete), for extrapolated timings.
    """
    cfg = tower.config
    L = spec.context_length
    seq = max(spec.prompt_length(p) for p in range(spec.num_prompts)) if truncate else L
    step = BaselineStep("truncated" if truncate else "padded", spec, tower, dict(weights), seq_len=seq)
    comps = _components(spec)
    if max_prompts is not None:
        kept, n = [], 0
        for c in comps:
            if n + len(c) > max_prompts and kept:
                break
            kept.append(c)
            n += len(c)
        comps = kept
    # pack components into micro-batches under the graph budget
    packs: list[list[int]] = [[]]
    for comp in comps:
        if packs[-1] and graph_bytes_estimate((len(packs[-1]) + len(comp)) * seq, seq, cfg.layers,
                                              cfg.width, cfg.heads) > max_graph_bytes:
            packs.append([])
        packs[-1].extend(comp)
    for pids in packs:
        member = set(pids)
        terms = []
        for task, ids in spec.task_prompts.items():
            cols = ids.view(-1, ids.shape[-1])
            cls = [c for c in range(cols.shape[1]) if int(cols[0, c]) in member]
            if cls:
                cls_t = torch.tensor(cls, dtype=torch.long)
                terms.append((task, ids[..., cls_t], cls_t))
        step.batches.append([_make_batch(spec, tower.text.token_embedding.weight, pids, seq, terms, dtype)])
    step.tokens = sum(b.tokens for g in step.batches for b in g)
    step.pooled = sum(b.eos.numel() for g in step.batches for b in g)
    return step
