"""Verification: exact verdicts for greedy, and distribution tests for MSS.

Sample size. A chi-square goodness-of-fit test over k cells with n samples, against a law whose
cell probabilities are off by delta_i, has noncentrality lambda = n * sum(delta_i**2 / p_i). A 1%
absolute error in one cell j (|delta_j| = 0.01) must be paid back by the other cells; the least
visible way spreads it in proportion to p, which gives lambda = n * delta_j**2 * (1/p_j +
1/(1 - p_j)) >= 4 * n * delta_j**2, smallest at p_j = 1/2. At alpha = 1e-3:
- first token, k <= 8 cells, n = 120,000: lambda >= 48, power > 0.99;
- first two tokens, k = 16 cells, n = 150,000: lambda >= 60, power > 0.99
(`test_sample_size_finds_a_one_percent_error`). The seeds are fixed, so each test is
deterministic; the correct verifier must reach p > 1e-3, a broken one must fall below 1e-12.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chi2, chisquare, ncx2

import specserve.tree.verify as verify_module
from specserve.tree import (
    TokenTree,
    VerifyResult,
    verify_greedy,
    verify_greedy_batch,
    verify_mss,
    verify_mss_batch,
)

NUM_SAMPLES = 120_000  # first-token tests, vocabularies of at most 8 tokens
NUM_JOINT_SAMPLES = 150_000  # first-two-tokens test, 4 * 4 cells
ALPHA = 1e-3

# Greedy fixtures. From paths [[1, 2, 3], [1, 4], [5], [1, 2, 6]] under root 9:
#
#   0:9 ─┬─ 1:1 ─┬─ 2:2 ─┬─ 3:3
#        │       │       └─ 6:6
#        │       └─ 4:4
#        └─ 5:5
TREE = TokenTree.from_paths(9, [[1, 2, 3], [1, 4], [5], [1, 2, 6]])
# Nodes 1 and 2 both guess token 2: 0:9 ─┬─ 1:2 ── 3:3
#                                        └─ 2:2 ── 4:4
DUPLICATES = TokenTree((9, 2, 2, 3, 4), (-1, 0, 0, 1, 2))


# ---------------------------------------------------------------------------------------------
# VerifyResult


def test_verify_result_counts_and_new_tokens() -> None:
    result = VerifyResult((0, 1, 2, 6), bonus_token=8)
    assert result.num_accepted_drafts == 3
    assert result.accepted_token_ids(TREE) == (1, 2, 6, 8)
    assert VerifyResult((0,), bonus_token=7).accepted_token_ids(TREE) == (7,)


@pytest.mark.parametrize("accepted_nodes", [(), (1, 2)])
def test_verify_result_starts_at_the_root(accepted_nodes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        VerifyResult(accepted_nodes, bonus_token=0)


# ---------------------------------------------------------------------------------------------
# Greedy


def test_greedy_accepts_the_deepest_path() -> None:
    #                         node: 0  1  2  3  4  5  6
    result = verify_greedy(TREE, [1, 2, 6, 0, 0, 0, 8])
    assert result == VerifyResult((0, 1, 2, 6), bonus_token=8)
    assert result.accepted_token_ids(TREE) == (1, 2, 6, 8)


def test_greedy_rejects_at_the_root() -> None:
    assert verify_greedy(TREE, [7, 2, 6, 0, 0, 0, 8]) == VerifyResult((0,), bonus_token=7)


def test_greedy_chooses_the_matching_sibling() -> None:
    assert verify_greedy(TREE, [5, 2, 6, 0, 0, 3, 8]) == VerifyResult((0, 5), bonus_token=3)
    assert verify_greedy(TREE, [1, 4, 6, 0, 1, 3, 8]) == VerifyResult((0, 1, 4), bonus_token=1)
    assert verify_greedy(TREE, [1, 2, 3, 5, 1, 3, 8]) == VerifyResult((0, 1, 2, 3), bonus_token=5)


def test_greedy_takes_the_first_of_duplicate_siblings() -> None:
    assert verify_greedy(DUPLICATES, [2, 3, 4, 0, 0]) == VerifyResult((0, 1, 3), bonus_token=0)
    # Node 2's child 4 would match, but node 1 (the first token-2 sibling) is the one taken.
    assert verify_greedy(DUPLICATES, [2, 4, 4, 0, 0]) == VerifyResult((0, 1), bonus_token=4)


def test_greedy_accepts_a_whole_chain_and_takes_a_tensor() -> None:
    chain = TokenTree.chain([9, 1, 2])
    assert verify_greedy(chain, torch.tensor([1, 2, 3])) == VerifyResult((0, 1, 2), 3)
    assert verify_greedy(chain, torch.tensor([1, 5, 3])) == VerifyResult((0, 1), 5)


def test_greedy_needs_one_argmax_per_node() -> None:
    with pytest.raises(ValueError):
        verify_greedy(TREE, [1, 2, 6])


def test_greedy_batch_equals_per_tree_calls() -> None:
    trees = [TREE, DUPLICATES, TokenTree.chain([4]), TREE, TokenTree.chain([9, 1, 2])]
    generator = torch.Generator().manual_seed(0)
    argmax_rows = [torch.randint(0, 7, (tree.num_nodes,), generator=generator) for tree in trees]
    argmax_rows[0] = torch.tensor([1, 2, 6, 0, 0, 0, 8])  # one deep acceptance for sure
    expected = [verify_greedy(tree, rows) for tree, rows in zip(trees, argmax_rows)]
    assert verify_greedy_batch(trees, torch.cat(argmax_rows)) == expected
    assert expected[0] == VerifyResult((0, 1, 2, 6), bonus_token=8)
    with pytest.raises(ValueError):
        verify_greedy_batch(trees, torch.cat(argmax_rows)[:-1])


# ---------------------------------------------------------------------------------------------
# MSS: helpers for sampling many trees of one shape


def _random_distribution(generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """A Dirichlet(1/2)-like law: squared normalised exponentials, so some tokens dominate."""
    weights = -torch.rand(vocab_size, generator=generator, dtype=torch.float64).log()
    weights = weights**2
    return (weights / weights.sum()).float()


def _sample_trees(
    parents: tuple[int, ...],
    proposals: list[torch.Tensor | int],
    vocab_size: int,
    num_samples: int,
    generator: torch.Generator,
) -> list[TokenTree]:
    """Trees of one shape; node i's token is drawn from proposals[i] (a law) or fixed (an int).

    Every sampled token is drawn independently, so siblings that share a law are i.i.d. Fixed
    guesses get an all-zero draft row, or no draft_probs at all when nothing is sampled.
    """
    columns, draft_probs = [], torch.zeros(len(parents), vocab_size)
    for node, proposal in enumerate(proposals):
        if isinstance(proposal, torch.Tensor):
            columns.append(torch.multinomial(proposal, num_samples, True, generator=generator))
            draft_probs[node] = proposal
        else:
            columns.append(torch.full((num_samples,), proposal))
    if not draft_probs.any():
        draft_probs = None
    token_rows = torch.stack(columns, dim=1).tolist()
    return [TokenTree(tuple(row), parents, draft_probs) for row in token_rows]


def _first_emitted_tokens(
    trees: list[TokenTree], target_probs: torch.Tensor, generator: torch.Generator
) -> np.ndarray:
    results = verify_mss_batch(trees, target_probs, generator)
    return np.array([result.accepted_token_ids(tree)[0] for result, tree in zip(results, trees)])


def _chi_square_pvalue(samples: np.ndarray, expected_probs: torch.Tensor) -> float:
    """Goodness of fit of integer ``samples`` to ``expected_probs``; zero cells must stay empty."""
    probs = expected_probs.double().flatten().numpy()
    probs = probs / probs.sum()
    counts = np.bincount(samples, minlength=probs.size)
    assert counts.size == probs.size
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of target probability 0 was emitted"
    return float(chisquare(counts[support], probs[support] * samples.size).pvalue)


def _first_token_case(name: str) -> tuple[tuple[int, ...], list[torch.Tensor | int], torch.Tensor]:
    """(parents, proposals, target row at the root) for one tree shape of the first-token test."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "iid":  # four root guesses i.i.d. from q, one grandchild
        q = _random_distribution(generator, 5)
        return (-1, 0, 0, 0, 0, 1), [0, q, q, q, q, q], _random_distribution(generator, 5)
    if name == "fixed_with_duplicates":  # deterministic guesses 2, 2, 4, 0; p(4) == 0
        p = _random_distribution(generator, 6)
        p[4] = 0
        return (-1, 0, 0, 0, 0, 2), [0, 2, 2, 4, 0, 5], p / p.sum()
    if name == "mixture":  # sampled from two laws (q1 with zeros) and fixed, interleaved
        q1, q2 = _random_distribution(generator, 8), _random_distribution(generator, 8)
        q1[[0, 5]] = 0
        q1 = q1 / q1.sum()
        proposals = [0, q1, 3, q1, q2, 3, q2, 1, q1]
        return (-1, 0, 0, 0, 0, 0, 1, 1, 2), proposals, _random_distribution(generator, 8)
    if name == "random_shape":  # 12 nodes, random parents, each guess fixed or from q1 / q2
        laws = [_random_distribution(generator, 7), _random_distribution(generator, 7)]
        parents, proposals = [-1, 0, 0], [0, laws[0], 6]
        for node in range(3, 12):
            parents.append(int(torch.randint(0, node, (), generator=generator)))
            kind = int(torch.randint(0, 3, (), generator=generator))
            proposals.append(
                laws[kind] if kind < 2 else int(torch.randint(0, 7, (), generator=generator))
            )
        return tuple(parents), proposals, _random_distribution(generator, 7)
    if name == "p_equals_q":  # residuals vanish: every first guess is accepted
        q = _random_distribution(generator, 6)
        return (-1, 0, 0, 0), [0, q, q, q], q.clone()
    raise AssertionError(name)


def _first_token_pvalue(name: str) -> float:
    parents, proposals, root_probs = _first_token_case(name)
    generator = torch.Generator().manual_seed(1234)
    trees = _sample_trees(parents, proposals, root_probs.shape[0], NUM_SAMPLES, generator)
    # Rows after non-root nodes do not touch the first token; give them some other law.
    other_rows = [_random_distribution(generator, root_probs.shape[0]) for _ in parents[1:]]
    target_probs = torch.stack([root_probs, *other_rows]).repeat(NUM_SAMPLES, 1)
    samples = _first_emitted_tokens(trees, target_probs, generator)
    return _chi_square_pvalue(samples, root_probs)


# ---------------------------------------------------------------------------------------------
# MSS: distribution tests


@pytest.mark.parametrize(("num_samples", "max_cells"), [(NUM_SAMPLES, 8), (NUM_JOINT_SAMPLES, 16)])
def test_sample_size_finds_a_one_percent_error(num_samples: int, max_cells: int) -> None:
    """The power claimed in the module docstring, for the sample sizes used here."""
    smallest_noncentrality = 4 * num_samples * 0.01**2
    for num_cells in range(2, max_cells + 1):
        df = num_cells - 1
        assert ncx2.sf(chi2.isf(ALPHA, df), df, smallest_noncentrality) > 0.99


FIRST_TOKEN_CASES = ["iid", "fixed_with_duplicates", "mixture", "random_shape", "p_equals_q"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIRST_TOKEN_CASES)
def test_mss_first_token_follows_the_target(name: str) -> None:
    assert _first_token_pvalue(name) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iid", "fixed_with_duplicates", "mixture"])
def test_mss_without_residual_update_fails_the_same_test(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power: accept with min(1, p/q) but keep p after a rejection (the classic bug)."""
    monkeypatch.setattr(verify_module, "_residual_after_rejection", lambda p, q: p)
    assert _first_token_pvalue(name) < 1e-12


@pytest.mark.slow
def test_mss_first_two_tokens_follow_the_target() -> None:
    """Joint law of two tokens through a depth-2 tree; a one-token step is followed by another.

    0 ─┬─ 1 ~ q1 ─┬─ 4 ~ q2(.|x1)        target after 0: p1
       │          └─ 5 ~ q2(.|x1)        target after c: p2(.|x_c)
       ├─ 2 ~ q1 ─┬─ 6 ~ q2(.|x2)
       │          └─ 7 ~ q2(.|x2)
       └─ 3 = 2 ──── 8 = 0               (fixed guesses)
    """
    vocab_size, n = 4, NUM_JOINT_SAMPLES
    generator = torch.Generator().manual_seed(7)
    p1 = _random_distribution(generator, vocab_size)  # [vocab] target's first token
    p2 = torch.stack([_random_distribution(generator, vocab_size) for _ in range(vocab_size)])
    q1 = _random_distribution(generator, vocab_size)
    q2 = torch.stack([_random_distribution(generator, vocab_size) for _ in range(vocab_size)])
    uniform = torch.full((vocab_size,), 1 / vocab_size)  # rows that cannot matter

    parents = (-1, 0, 0, 0, 1, 1, 2, 2, 3)
    x1 = torch.multinomial(q1, 2 * n, True, generator=generator).view(n, 2)  # nodes 1, 2
    x2 = torch.multinomial(q2[x1.flatten()], 2, True, generator=generator).view(n, 4)  # 4..7
    fixed = torch.tensor([0, 2, 0]).expand(n, 3)  # root, node 3, node 8
    tokens = torch.cat([fixed[:, :1], x1, fixed[:, 1:2], x2, fixed[:, 2:]], dim=1)
    zeros = torch.zeros(n, 1, vocab_size)
    draft_probs = torch.cat(
        [zeros, q1.expand(n, 2, -1), zeros, q2[x1].repeat_interleave(2, dim=1), zeros], dim=1
    )
    target_probs = torch.cat(
        [p1.expand(n, 1, -1), p2[tokens[:, 1:4]], uniform.expand(n, 5, -1)], dim=1
    )
    trees = [
        TokenTree(tuple(row), parents, draft_probs[i]) for i, row in enumerate(tokens.tolist())
    ]
    results = verify_mss_batch(trees, target_probs.reshape(-1, vocab_size), generator)
    emitted = [result.accepted_token_ids(tree) for result, tree in zip(results, trees)]

    # Steps that emitted one token run a second step: root = that token, two guesses ~ q2.
    short = [i for i, new_tokens in enumerate(emitted) if len(new_tokens) == 1]
    assert 0 < len(short) < n
    first = torch.tensor([emitted[i][0] for i in short])
    guesses = torch.multinomial(q2[first], 2, True, generator=generator)
    second_draft_probs = [
        torch.stack([torch.zeros(vocab_size), q2[a], q2[a]]) for a in range(vocab_size)
    ]
    second_trees = [
        TokenTree((a, *g), (-1, 0, 0), second_draft_probs[a])
        for a, g in zip(first.tolist(), guesses.tolist())
    ]
    second_target = torch.cat([p2[first, None], uniform.expand(len(short), 2, -1)], dim=1)
    second = _first_emitted_tokens(second_trees, second_target.reshape(-1, vocab_size), generator)
    for i, token in zip(short, second.tolist()):
        emitted[i] = (emitted[i][0], token)

    pairs = np.array([a * vocab_size + b for a, b, *_ in emitted])
    assert _chi_square_pvalue(pairs, p1[:, None] * p2) > ALPHA


# ---------------------------------------------------------------------------------------------
# MSS: exact behaviour


def _random_tree(generator: torch.Generator, num_nodes: int, vocab_size: int) -> TokenTree:
    parents = [-1] + [
        int(torch.randint(0, i, (), generator=generator)) for i in range(1, num_nodes)
    ]
    tokens = torch.randint(0, vocab_size, (num_nodes,), generator=generator).tolist()
    return TokenTree(tuple(tokens), tuple(parents))


@pytest.mark.parametrize("seed", range(20))
def test_mss_with_one_hot_target_is_greedy(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    vocab_size = 4  # small: many children match the argmax, duplicates are common
    tree = _random_tree(generator, num_nodes=12, vocab_size=vocab_size)
    argmax = torch.randint(0, vocab_size, (tree.num_nodes,), generator=generator)
    one_hot = torch.nn.functional.one_hot(argmax, vocab_size).float()
    expected = verify_greedy(tree, argmax)

    assert verify_mss(tree, one_hot, generator) == expected  # point-mass guesses
    draft_probs = torch.stack(
        [_random_distribution(generator, vocab_size) for _ in range(tree.num_nodes)]
    )
    sampled = TokenTree(tree.token_ids, tree.parents, draft_probs)
    assert verify_mss(sampled, one_hot, generator) == expected  # sampled guesses


def _random_case(seed: int) -> tuple[list[TokenTree], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    trees = [_random_tree(generator, n, vocab_size=3) for n in (1, 6, 9, 4)]
    rows = sum(tree.num_nodes for tree in trees)
    target_probs = torch.stack([_random_distribution(generator, 3) for _ in range(rows)])
    return trees, target_probs


def test_mss_same_seed_same_result() -> None:
    trees, target_probs = _random_case(seed=5)
    runs = [
        verify_mss_batch(trees, target_probs, torch.Generator().manual_seed(seed))
        for seed in (11, 11, 12, 13)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]


def test_mss_per_tree_generators_match_single_tree_calls() -> None:
    trees, target_probs = _random_case(seed=6)
    seeds = [21, 22, 23, 24]
    batched = verify_mss_batch(
        trees, target_probs, [torch.Generator().manual_seed(seed) for seed in seeds]
    )
    start = 0
    for tree, seed, result in zip(trees, seeds, batched):
        rows = target_probs[start : start + tree.num_nodes]
        assert verify_mss(tree, rows, torch.Generator().manual_seed(seed)) == result
        start += tree.num_nodes
    with pytest.raises(ValueError):
        verify_mss_batch(trees, target_probs, [torch.Generator()])


def test_residual_after_rejection() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    q = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.5 / 0.7, 0.0, 0.2 / 0.7], [0.25, 0.25, 0.5]])
    # Row 3: p == q leaves no residual; p itself is kept (a rejection had probability 0).
    torch.testing.assert_close(verify_module._residual_after_rejection(p, q), expected)


def test_mss_rejects_a_token_its_draft_row_cannot_produce() -> None:
    draft_probs = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    tree = TokenTree((0, 1), (-1, 0), draft_probs)
    with pytest.raises(ValueError):
        verify_mss(tree, torch.full((2, 2), 0.5))


def test_mss_needs_one_target_row_per_node() -> None:
    with pytest.raises(ValueError):
        verify_mss(TREE, torch.full((3, 10), 0.1))
