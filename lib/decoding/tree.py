"""Reference tree speculative decoding (EAGLE-2 style), greedy, batch 1: the reference run of the logits comparison.

One round:
1. The drafter (a separate draft model, or an EAGLE head over the target's hidden states) grows a tree from the
   root (the last emitted token, not yet in the target's cache): the root's top-k children, then spec_num_iter - 1
   expansions, each feeding the current frontier (k nodes) in one tree-masked draft forward and keeping the k best
   of the k*k children by cumulative log-probability as the next frontier.
2. Of every candidate, the spec_tree_size - 1 with the highest cumulative log-probability are kept (ancestor-closed,
   since a child never scores above its parent); with the root that is spec_tree_size nodes.
3. The target scores root + tree in ONE forward: a 4D additive mask lets each node see the committed cache and its
   own ancestors, position ids are the nodes' depths past the root.
4. Greedy acceptance walks down from the root while the target's argmax is a child in the tree; the emitted tokens
   are the accepted path plus the target's token after it (the bonus). Every emitted token is the target's argmax,
   so the output equals AR decoding.
5. The target's KV cache is compacted to the committed prefix + root + accepted path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lib.decoding.chain import _Rows

# ---------------------------------------------------------------------------------------------- KV cache helpers

def cache_length(cache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def keep_cache_columns(cache, keep: torch.Tensor):
    """Keep only these sequence columns (1-D index tensor) in every layer of a DynamicCache."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


def crop_cache(cache, length: int):
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


def tree_attention_mask(past: int, parents: list[int], new: list[int], fed: list[int], dtype,
                        device) -> torch.Tensor:
    """Additive mask [1, 1, len(new), past + len(fed) + len(new)] for feeding nodes `new` after `fed` ones.

    Columns: `past` committed tokens (all visible), then the nodes already fed this round (`fed`, in cache order),
    then `new`. A node sees committed columns and the columns of its ancestors and itself.
    """
    columns = fed + new
    position = {node: i for i, node in enumerate(columns)}
    allowed = torch.zeros(len(new), past + len(columns), dtype=torch.bool)
    allowed[:, :past] = True
    for row, node in enumerate(new):
        walk = node
        while walk >= 0:
            if walk in position:
                allowed[row, past + position[walk]] = True
            walk = parents[walk]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def target_forward(target, tokens: torch.Tensor, positions: torch.Tensor, cache, mask=None):
    """Target logits [n, V] (float32) and last hidden states [n, H] (post-norm, what EAGLE heads read)."""
    from transformers import DynamicCache
    cache = cache if cache is not None else DynamicCache()
    if mask is None:  # a causal chain after the cache
        mask = torch.ones(1, cache_length(cache) + tokens.numel(), dtype=torch.long, device=tokens.device)
    out = target.model(input_ids=tokens[None], position_ids=positions[None], attention_mask=mask,
                       past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[0]
    return target.lm_head(hidden).float(), hidden, out.past_key_values


# ---------------------------------------------------------------------------------------------- drafters

class ModelDrafter:
    """A separate small causal LM with the target's tokenizer; its cache holds every emitted token."""
    kind = "model"

    def __init__(self, model):
        from transformers import DynamicCache
        self.model = model
        self.cache = DynamicCache()

    def begin(self, seq: list[int], new_features: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        start = cache_length(self.cache)
        device = self.model.device
        tokens = torch.tensor(seq[start:], device=device)
        positions = torch.arange(start, len(seq), device=device)
        out = self.model(input_ids=tokens[None], position_ids=positions[None], past_key_values=self.cache,
                         attention_mask=torch.ones(1, len(seq), dtype=torch.long, device=device), use_cache=True)
        self.cache = out.past_key_values
        self.committed = len(seq)
        return out.logits[0, -1].float(), None

    def expand(self, tree: DraftTree, new: list[int], fed: list[int]) -> tuple[torch.Tensor, list]:
        device = self.model.device
        tokens = torch.tensor([tree.tokens[n] for n in new], device=device)
        positions = torch.tensor([self.committed - 1 + tree.depth[n] for n in new], device=device)
        mask = tree_attention_mask(self.committed, tree.parents, new, fed, self.model.dtype, device)
        out = self.model(input_ids=tokens[None], position_ids=positions[None], attention_mask=mask,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[0].float(), [None] * len(new)

    def end(self):
        crop_cache(self.cache, self.committed)


class EagleDrafter:
    """An EAGLE head (lib/decoding/eagle.py): pairs (token t+1, target feature t) -> predicted feature t+1."""
    kind = "eagle"

    def __init__(self, head, target):
        from transformers import DynamicCache
        self.head, self.target = head, target
        self.cache = DynamicCache()
        self.features = None  # target features not yet fed to the head, for positions cached..len(seq)-2

    def begin(self, seq: list[int], new_features: torch.Tensor) -> tuple[torch.Tensor, object]:
        start = cache_length(self.cache)  # pairs cached for positions 0..start-1
        self.features = new_features if self.features is None else torch.cat([self.features, new_features])
        device = self.features.device
        n = len(seq) - 1 - start  # pairs for positions start..len(seq)-2
        tokens = torch.tensor(seq[start + 1:], device=device)
        positions = torch.arange(start, start + n, device=device)
        hidden = self.head(tokens, self.features[:n], positions, self.cache)
        self.features = self.features[n:]
        self.committed = len(seq) - 1
        return self.target.lm_head(hidden[-1]).float(), hidden[-1]

    def expand(self, tree: DraftTree, new: list[int], fed: list[int]) -> tuple[torch.Tensor, list]:
        device = self.features.device
        tokens = torch.tensor([tree.tokens[n] for n in new], device=device)
        parents_hidden = torch.stack([tree.states[tree.parents[n]] for n in new])
        positions = torch.tensor([self.committed - 1 + tree.depth[n] for n in new], device=device)
        mask = tree_attention_mask(self.committed, tree.parents, new, fed, parents_hidden.dtype, device)
        hidden = self.head(tokens, parents_hidden, positions, self.cache, mask)
        return self.target.lm_head(hidden).float(), list(hidden)

    def end(self):
        crop_cache(self.cache, self.committed)


# ---------------------------------------------------------------------------------------------- the tree

@dataclass
class DraftTree:
    """Node 0 is the root. parents[i] < i for the selected tree (nodes sorted by depth)."""
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    states: list = field(default_factory=list)

    def add(self, token: int, parent: int, score: float, state=None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        self.scores.append(score)
        self.states.append(state)
        return len(self.tokens) - 1


def _add_children(tree: DraftTree, parent: int, logits: torch.Tensor, k: int) -> list[int]:
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k)
    base = tree.scores[parent]
    return [tree.add(int(t), parent, base + float(v)) for v, t in zip(values.tolist(), ids.tolist())]


def build_draft_tree(drafter, root_token: int, seq: list[int], new_features, num_iter: int, topk: int,
                     tree_size: int) -> DraftTree:
    """Grow the candidate tree, then return the selected spec_tree_size nodes (root first, sorted by depth)."""
    pool = DraftTree()
    root_logits, root_state = drafter.begin(seq, new_features)
    pool.add(root_token, -1, 0.0, root_state)
    frontier = _add_children(pool, 0, root_logits, topk)
    fed: list[int] = []
    for _ in range(num_iter - 1):
        logits, states = drafter.expand(pool, frontier, fed)
        fed += frontier
        children = []
        for row, node in enumerate(frontier):
            pool.states[node] = states[row]
            children += _add_children(pool, node, logits[row], topk)
        frontier = sorted(children, key=lambda n: -pool.scores[n])[:topk]
    drafter.end()

    ranked = sorted(range(1, len(pool.tokens)), key=lambda n: (-pool.scores[n], pool.depth[n], n))
    chosen = sorted([0] + ranked[: tree_size - 1], key=lambda n: (pool.depth[n], n))
    index = {old: new for new, old in enumerate(chosen)}
    tree = DraftTree()
    for old in chosen:
        tree.add(pool.tokens[old], index[pool.parents[old]] if old else -1, pool.scores[old])
    return tree


# ---------------------------------------------------------------------------------------------- decoding

@dataclass
class TreeStep:
    """One emitted token: the target logits row that produced it (at the node it follows)."""
    token: int
    logits: torch.Tensor  # [V] float32
    round: int


@dataclass
class TreeRound:
    tree_tokens: list[int]
    tree_parents: list[int]
    accepted_path: list[int]  # node indices (root excluded)
    accept_length: int  # accepted draft tokens (bonus excluded)
    seconds: float


@dataclass
class TreeGeneration:
    tokens: list[int]
    steps: list[TreeStep]
    rounds: list[TreeRound]
    finish_reason: str
    prefill_seconds: float


@torch.inference_mode()
def tree_speculative_generate(target, drafter, prompt: list[int], max_new: int, num_iter: int, topk: int,
                              tree_size: int, eos_ids: set[int] = frozenset(),
                              prefill_chunk: int = 1024) -> TreeGeneration:
    """Greedy tree SD for one prompt; returns the tokens, per-token target logits and per-round trees."""
    if tree_size < 2 or num_iter < 1 or topk < 1:
        raise ValueError("tree SD needs tree_size >= 2, num_iter >= 1 and topk >= 1")
    device = target.device
    t0 = time.perf_counter()
    cache, hidden_parts = None, []
    for begin in range(0, len(prompt), prefill_chunk):  # chunked prefill
        chunk = prompt[begin:begin + prefill_chunk]
        logits, hidden, cache = target_forward(target, torch.tensor(chunk, device=device),
                                               torch.arange(begin, begin + len(chunk), device=device), cache)
        hidden_parts.append(hidden)
    hidden = torch.cat(hidden_parts)
    first = int(logits[-1].argmax())
    steps = [TreeStep(first, logits[-1], 0)]
    rows, rounds = _Rows(1, max_new, set(eos_ids)), []
    rows.add(0, [first], time.perf_counter())
    out, seq = rows.tokens[0], list(prompt) + [first]
    new_features = hidden  # target features for positions 0..len(seq)-2
    prefill_s = time.perf_counter() - t0

    while not rows.done():
        start = time.perf_counter()
        tree = build_draft_tree(drafter, seq[-1], seq, new_features, num_iter, topk, tree_size)
        past = cache_length(cache)
        nodes = list(range(len(tree.tokens)))
        mask = tree_attention_mask(past, tree.parents, nodes, [], target.dtype, device)
        positions = torch.tensor([past + d for d in tree.depth], device=device)
        logits, hidden, cache = target_forward(target, torch.tensor(tree.tokens, device=device), positions,
                                               cache, mask)
        children: dict[int, dict[int, int]] = {}
        for node in nodes[1:]:
            children.setdefault(tree.parents[node], {})[tree.tokens[node]] = node
        path, node = [0], 0
        predicted = logits.argmax(-1).tolist()
        while predicted[node] in children.get(node, {}):
            node = children[node][predicted[node]]
            path.append(node)
        keep = torch.cat([torch.arange(past, device=device), past + torch.tensor(path, device=device)])
        keep_cache_columns(cache, keep)
        new_features = hidden[path]
        emitted = [tree.tokens[n] for n in path[1:]] + [predicted[path[-1]]]  # emitted[i]: the argmax at path[i]
        before = len(out)
        rows.add(0, emitted, time.perf_counter())  # stops at EOS or max_new
        steps += [TreeStep(token, logits[node], len(rounds) + 1) for token, node in zip(out[before:], path)]
        seq = list(prompt) + out
        rounds.append(TreeRound(tree.tokens, tree.parents, path[1:], len(path) - 1, time.perf_counter() - start))
    return TreeGeneration(out, steps, rounds, rows.reasons[0], prefill_s)
