"""One speculative step, as in the paper: propose -> verify -> accept -> commit.

- propose: the drafter grows a token tree rooted at each sequence's pending token;
- verify:  the target's logits at every tree node decide which path survives
           (greedy: longest path of argmax matches; sampling: multi-step speculative sampling);
- accept:  the path's drafts plus the bonus token become the sequence's new tokens, cut at
           max_tokens, EOS or a stop token;
- commit:  the accepted path's K/V move to consecutive positions (depth-first), the rest of
           the tree's slots are released, full committed blocks become shareable prefix.

A step without speculation is the same code with a one-node tree.
"""

from __future__ import annotations

import torch

from draft_models.base import Drafter, DraftRequest
from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.engine.sampler import shape_logits, target_probs
from specserve.engine.sequence import Sequence
from specserve.tree import TokenTree
from specserve.tree.verify import VerifyResult, verify_greedy, verify_mss_batch


def propose(drafter: Drafter | None, seqs: list[Sequence], num_slots: list[int]) -> list[TokenTree]:
    """A tree per sequence: its pending token as root plus at most num_slots - 1 drafts, never
    deeper than its policy's max_depth nor than the tokens it may still generate, drafted only by
    the drafters its policy allows."""
    roots = [TokenTree((seq.token_ids[-1],), (-1,)) for seq in seqs]
    if drafter is None:
        return roots
    # only sequences with room for a draft (slots past the root, a depth of at least 1) ask: a
    # step the batch gate keeps plain builds no requests at all
    depths = [min(seq.speculation.max_depth, seq.remaining_tokens - 1) if slots > 1 else 0
              for seq, slots in zip(seqs, num_slots)]
    wanted = [i for i, depth in enumerate(depths) if depth > 0]
    if not wanted:
        return roots
    requests = [
        DraftRequest(seqs[i].request_id, seqs[i].token_ids, num_slots[i] - 1, depths[i], seqs[i].speculation.drafters,
                     own_context_only=seqs[i].params.reproducible)
        for i in wanted
    ]
    trees = drafter.propose(requests)
    for i, tree in zip(wanted, trees):
        roots[i] = tree
    return roots


def target_logits(seq: Sequence, tree: TokenTree, rows: torch.Tensor) -> torch.Tensor:
    """rows [num_nodes, vocab]: the target's logits at the tree's nodes, shaped by the request's
    logit_bias and penalties; node u's penalties count the tokens on its path (``token_counts``)."""
    if not seq.params.uses_history:
        return shape_logits(rows, seq.params)
    counts = seq.token_counts.along_tree(tree)
    return shape_logits(rows, seq.params, counts, seq.token_counts.prompt_mask)


def verify(seqs: list[Sequence], trees: list[TokenTree], logits: torch.Tensor) -> list[VerifyResult]:
    """logits [sum of tree sizes, vocab]: the target's next-token logits at every node, trees in order.

    Every row is first processed under the request's controls (``sampler``), so greedy follows
    the processed argmax and MSS judges the drafts against the processed distribution: the
    output law is plain sampling's with the same controls.
    """
    results: list[VerifyResult | None] = [None] * len(seqs)
    argmax = None
    sampled: list[int] = []  # sequences verified by MSS, all in one batch (one host read per round)
    sampled_probs: list[torch.Tensor] = []
    start = 0
    for i, (seq, tree) in enumerate(zip(seqs, trees)):
        rows = logits[start : start + tree.num_nodes]
        start += tree.num_nodes
        if seq.params.greedy and not seq.params.shifts_logits:
            if argmax is None:
                argmax = logits.argmax(dim=-1).tolist()  # one host read for every plain greedy sequence
            results[i] = verify_greedy(tree, argmax[start - tree.num_nodes : start])
        elif seq.params.greedy:
            results[i] = verify_greedy(tree, target_logits(seq, tree, rows).argmax(dim=-1))
        else:
            sampled.append(i)
            sampled_probs.append(target_probs(target_logits(seq, tree, rows), seq.params))
    if sampled:  # per-sequence generators: each result is the one verify_mss would give it alone
        batch = verify_mss_batch([trees[i] for i in sampled], torch.cat(sampled_probs),
                                 [seqs[i].generator for i in sampled])
        for i, result in zip(sampled, batch):
            results[i] = result
    assert all(result is not None for result in results)  # every sequence got its result above
    return results


def accept(seq: Sequence, tree: TokenTree, result: VerifyResult, eos_token_ids: tuple[int, ...]) -> list[int]:
    """The new tokens of this step, cut after the first one that finishes the request.

    Sets seq.finish_reason ("stop" for EOS or a stop token id, "length" for max_tokens).
    """
    candidates = [tree.token_ids[node] for node in result.accepted_nodes[1:]] + [result.bonus_token]
    new_tokens: list[int] = []
    for token in candidates:
        new_tokens.append(token)
        if token in seq.params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            break
        if token in eos_token_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            break
        if seq.num_generated + len(new_tokens) >= seq.params.max_tokens:
            seq.finish_reason = "length"
            break
    return new_tokens


def commit(
    kv_manager: KVCacheManager,
    seq: Sequence,
    prefix_len: int,
    accepted_nodes: tuple[int, ...],
    moves: tuple[list[int], list[int]],
) -> None:
    """Keep the accepted path's K/V at positions prefix_len .. prefix_len + len(path) - 1: its slot
    moves join ``moves`` (src_slots, dst_slots), which the caller applies with one
    ``KVCache.move_slots`` for the whole step before the next forward. The tree's blocks past the
    path are released now; nothing writes to a released block before that forward, and sequences'
    tree slots are disjoint, so one gather-then-scatter for every sequence moves what each
    sequence's own would."""
    src, dst = kv_manager.commit_path(seq.request_id, prefix_len, list(accepted_nodes))
    moves[0].extend(src)
    moves[1].extend(dst)
    seq.num_computed = prefix_len + len(accepted_nodes)
    kv_manager.trim(seq.request_id, seq.num_computed)
    kv_manager.register_committed(seq.request_id, seq.token_ids, seq.num_computed)
