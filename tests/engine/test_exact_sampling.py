"""Speculative sampling under every sampling control has plain sampling's law (chi-square tests).

Plain sampling with a control draws token t+1 from ``target_probs(shape_logits(logits_t, counts_t))``
(``engine.sampler``). Speculation verifies a tree whose node u's row is processed with the counts
of its own path (``engine.token_counts``) and judges the drafts against those rows by multi-step
speculative sampling. These tests run that pipeline (the functions ``speculative.verify``
composes; `test_harness_equals_the_engines_verify` checks it is the same) on many trees and
compare the emitted tokens with the plain law.

Synthetic cases: a bigram "model" over 4 tokens, logits W[previous token], and a drafter that
knows nothing of the controls (its own bigram Q: children sampled i.i.d. from Q, and fixed
guesses). The statistic is the joint law of the first two generated tokens (16 cells),
p1(a) * p2(b | a), where p2 counts a among the generated tokens: the second token is where
path-dependent penalties show. Sample size and power are tests/tree/test_verify.py's (150,000
samples, 16 cells, alpha 1e-3: a 1% error in one cell is found with probability > 0.99). Seeds
are fixed, so every test is deterministic; the right pipeline must reach p > 1e-3, a broken one
fall below 1e-12.

Real-model cases: SmolLM2's logits after a chat prompt and a few generated tokens; the tree's
guesses are the model's own top tokens before the controls (point masses, as the engine's
drafters propose). See `_compress` for the exact reduction of the vocabulary to a few cells.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import specserve.engine.speculative as speculative
import specserve.engine.token_counts as token_counts_module
from specserve.config import SamplingParams
from specserve.engine.model_runner import prompt_logits
from specserve.engine.sampler import shape_logits, target_probs
from specserve.engine.sequence import Sequence
from specserve.engine.token_counts import TokenCounts
from specserve.tree import TokenTree, verify_mss, verify_mss_batch
from specserve.tree.verify import verify_greedy

ALPHA = 1e-3
NUM_JOINT_SAMPLES = 150_000  # two tokens, 16 cells
NUM_SAMPLES = 120_000  # real model, first token, at most 8 cells
VOCAB = 4
PROMPT_IDS = [3]
GENERATED_IDS = [1, 1, 2]  # the root (last token) is 2; token 1 was generated twice; 0 never seen

CONTROLS = {
    "temperature": SamplingParams(temperature=0.6),
    "top_k": SamplingParams(top_k=2),
    "top_p": SamplingParams(top_p=0.7),
    "min_p": SamplingParams(min_p=0.3),
    "presence_penalty": SamplingParams(presence_penalty=1.5),
    "frequency_penalty": SamplingParams(frequency_penalty=1.2),
    "repetition_penalty": SamplingParams(repetition_penalty=2.5),
    "logit_bias": SamplingParams(logit_bias=((0, 1.5), (3, -2.0))),
    "penalties": SamplingParams(presence_penalty=-0.5, frequency_penalty=0.8, repetition_penalty=1.6),
    "penalties_top_p": SamplingParams(temperature=0.8, top_p=0.8, frequency_penalty=1.0, repetition_penalty=1.3),
    "all": SamplingParams(temperature=1.3, top_k=3, top_p=0.9, min_p=0.1, presence_penalty=0.7,
                          frequency_penalty=0.4, repetition_penalty=1.4, logit_bias=((1, 1.0), (2, -0.5))),
}

# The first step's tree. "q" nodes are drawn from Q[parent's token], independently of siblings;
# integers are fixed guesses. Node 3 guesses the root's own token again (a repeat, penalised).
#
#   0 ─┬─ 1 ~ q ─┬─ 4 ~ q
#      │         └─ 5 ~ q
#      ├─ 2 ~ q ──── 6 = 1
#      └─ 3 = 2 ──── 7 ~ q
PARENTS = (-1, 0, 0, 0, 1, 1, 2, 3)
PROPOSALS: list[str | int] = ["root", "q", "q", 2, "q", "q", 1, "q"]
SECOND_PARENTS = (-1, 0, 0)  # the follow-up step of samples whose first step emitted one token
SECOND_PROPOSALS: list[str | int] = ["root", "q", "q"]


def _bigram(seed: int, sharpness: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return sharpness * torch.randn(VOCAB, VOCAB, generator=generator)  # [previous, next] logits


W = _bigram(0, 1.5)  # the target
Q = torch.softmax(_bigram(1, 1.0) + W, dim=-1)  # the drafter's law: related to W, never processed


def _processed(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None,
               prompt_mask: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] the processed law, as plain sampling and verification compute it."""
    return target_probs(shape_logits(logits, params, counts, prompt_mask), params)


def _base_counts() -> TokenCounts:
    return TokenCounts.from_tokens(PROMPT_IDS, GENERATED_IDS, VOCAB, torch.device("cpu"))


def plain_joint_law(params: SamplingParams) -> torch.Tensor:
    """[VOCAB, VOCAB] P(first = a, second = b) of plain sampling: p1(a) * p2(b | a)."""
    base = _base_counts()
    p1 = _processed(W[GENERATED_IDS[-1]][None], params, base.output_counts[None], base.prompt_mask)[0]
    counts_after = base.output_counts[None] + torch.eye(VOCAB)  # row a: a was generated too
    p2 = _processed(W, params, counts_after, base.prompt_mask)
    return p1[:, None] * p2


def _sample_trees(roots: torch.Tensor, parents: tuple[int, ...], proposals: list[str | int],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [n, nodes], draft_probs [n, nodes, VOCAB]) for trees of one shape."""
    n = roots.shape[0]
    tokens = torch.zeros(n, len(parents), dtype=torch.long)
    draft_probs = torch.zeros(n, len(parents), VOCAB)
    tokens[:, 0] = roots
    for node in range(1, len(parents)):
        if proposals[node] == "q":
            law = Q[tokens[:, parents[node]]]
            tokens[:, node] = torch.multinomial(law, 1, generator=generator)[:, 0]
            draft_probs[:, node] = law
        else:
            tokens[:, node] = proposals[node]
    return tokens, draft_probs


def speculative_step(params: SamplingParams, roots: torch.Tensor, generated_before: torch.Tensor,
                     parents: tuple[int, ...], proposals: list[str | int],
                     generator: torch.Generator) -> list[tuple[int, ...]]:
    """One verify step for n sequences: the new tokens of each.

    ``generated_before`` [n, VOCAB]: each sequence's output counts (the root counted). Node u's
    row: W[token u], processed with those counts plus u's path (``path_token_counts``).
    """
    base = _base_counts()
    tokens, draft_probs = _sample_trees(roots, parents, proposals, generator)
    n, num_nodes = tokens.shape
    path_counts = token_counts_module.path_token_counts(parents, tokens, VOCAB)  # [n, nodes, V]
    counts = generated_before[:, None, :] + path_counts
    rows = _processed(W[tokens].reshape(-1, VOCAB), params, counts.reshape(-1, VOCAB), base.prompt_mask)
    trees = [TokenTree(tuple(row), parents, probs) for row, probs in zip(tokens.tolist(), draft_probs)]
    results = verify_mss_batch(trees, rows, generator)
    return [result.accepted_token_ids(tree) for result, tree in zip(results, trees)]


def speculative_first_two_tokens(params: SamplingParams, num_samples: int, seed: int) -> np.ndarray:
    """Cell a * VOCAB + b of the first two tokens of ``num_samples`` speculative decodes."""
    generator = torch.Generator().manual_seed(seed)
    base = _base_counts().output_counts
    roots = torch.full((num_samples,), GENERATED_IDS[-1])
    emitted = speculative_step(params, roots, base.expand(num_samples, -1), PARENTS, PROPOSALS, generator)
    short = [i for i, new_tokens in enumerate(emitted) if len(new_tokens) == 1]
    assert 0 < len(short) < num_samples  # both paths to the second token are exercised
    first = torch.tensor([emitted[i][0] for i in short])
    counts = base[None] + torch.nn.functional.one_hot(first, VOCAB).float()
    second = speculative_step(params, first, counts, SECOND_PARENTS, SECOND_PROPOSALS, generator)
    pairs = [(e[0], e[1]) if len(e) > 1 else None for e in emitted]
    for i, new_tokens in zip(short, second):
        pairs[i] = (emitted[i][0], new_tokens[0])
    return np.array([a * VOCAB + b for a, b in pairs])


def chi_square_pvalue(samples: np.ndarray, expected_probs: torch.Tensor) -> float:
    """Goodness of fit; cells expecting < 5 are pooled. 0.0 when a cell of probability 0 was hit."""
    probs = expected_probs.double().flatten().numpy()
    probs = probs / probs.sum()
    counts = np.bincount(samples, minlength=probs.size)
    assert counts.size == probs.size
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected, observed = probs[support] * samples.size, counts[support]
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    return float(chisquare(observed, expected).pvalue)


# ---------------------------------------------------------------------------------------------
# Synthetic vocabulary: one test per control and for combinations


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_speculative_sampling_with_a_control_follows_plain_sampling(name: str) -> None:
    params = CONTROLS[name]
    samples = speculative_first_two_tokens(params, NUM_JOINT_SAMPLES, seed=sum(map(ord, name)))
    assert chi_square_pvalue(samples, plain_joint_law(params)) > ALPHA


def test_controls_change_the_law_enough_to_be_seen() -> None:
    """Each control moves the plain law well away from the raw one (so its test tests something)."""
    raw = plain_joint_law(SamplingParams())
    for name, params in CONTROLS.items():
        assert (plain_joint_law(params) - raw).abs().max() > 0.02, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["frequency_penalty", "repetition_penalty", "penalties"])
def test_penalties_without_path_counts_fail_the_same_test(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power: every node's row penalised with the committed counts only (its path ignored)."""
    monkeypatch.setattr(token_counts_module, "path_token_counts",
                        lambda parents, tokens, vocab: torch.zeros(*tokens.shape, vocab))
    params = CONTROLS[name]
    samples = speculative_first_two_tokens(params, NUM_JOINT_SAMPLES, seed=sum(map(ord, name)))
    assert chi_square_pvalue(samples, plain_joint_law(params)) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name", ["top_p", "logit_bias"])
def test_verifying_against_the_raw_distribution_fails_the_same_test(name: str) -> None:
    """Power: speculation that ignores the control (drafts judged against the raw target)."""
    samples = speculative_first_two_tokens(SamplingParams(), NUM_JOINT_SAMPLES, seed=sum(map(ord, name)))
    assert chi_square_pvalue(samples, plain_joint_law(CONTROLS[name])) < 1e-12


@pytest.mark.parametrize("name", ["penalties", "all", "temperature"])
def test_harness_equals_the_engines_verify(name: str) -> None:
    """``speculative.verify`` on real ``Sequence``s gives exactly the harness's verdicts."""
    params = CONTROLS[name]
    generator = torch.Generator().manual_seed(3)
    tokens, draft_probs = _sample_trees(torch.full((6,), GENERATED_IDS[-1]), PARENTS, PROPOSALS, generator)
    trees = [TokenTree(tuple(row), PARENTS, probs) for row, probs in zip(tokens.tolist(), draft_probs)]
    seqs = []
    for seed in range(len(trees)):
        seq = Sequence(f"s{seed}", PROMPT_IDS + GENERATED_IDS, len(PROMPT_IDS), params,
                       torch.Generator().manual_seed(seed), None, 0.0)
        seq.token_counts = _base_counts() if params.uses_history else None
        seqs.append(seq)
    logits = W[tokens].reshape(-1, VOCAB)
    results = speculative.verify(seqs, trees, logits)

    base = _base_counts()
    for seed, (tree, result) in enumerate(zip(trees, results)):
        path = token_counts_module.path_token_counts(PARENTS, torch.tensor(tree.token_ids), VOCAB)
        counts = base.output_counts[None] + path
        rows = _processed(W[list(tree.token_ids)], params, counts, base.prompt_mask)
        assert verify_mss(tree, rows, torch.Generator().manual_seed(seed)) == result
    assert any(result.num_accepted_drafts > 0 for result in results)


def test_greedy_and_sampled_sequences_in_one_verify_keep_their_own_verdicts() -> None:
    """Greedy sequences between sampled ones: each result lands at its own sequence's index."""
    generator = torch.Generator().manual_seed(5)
    tokens, draft_probs = _sample_trees(torch.full((4,), GENERATED_IDS[-1]), PARENTS, PROPOSALS, generator)
    trees = [TokenTree(tuple(row), PARENTS, probs) for row, probs in zip(tokens.tolist(), draft_probs)]
    kinds = [SamplingParams(temperature=0.0), CONTROLS["temperature"], SamplingParams(temperature=0.0),
             CONTROLS["temperature"]]
    seqs = [Sequence(f"s{i}", PROMPT_IDS + GENERATED_IDS, len(PROMPT_IDS), params, torch.Generator().manual_seed(i),
                     None, 0.0) for i, params in enumerate(kinds)]
    logits = W[tokens].reshape(-1, VOCAB)
    results = speculative.verify(seqs, trees, logits)
    for i, (tree, result) in enumerate(zip(trees, results)):
        rows = logits[i * len(PARENTS) : (i + 1) * len(PARENTS)]
        if i % 2 == 0:
            assert result == verify_greedy(tree, rows.argmax(-1).tolist())
        else:
            processed = _processed(W[list(tree.token_ids)], kinds[i], None, None)
            assert result == verify_mss(tree, processed, torch.Generator().manual_seed(i))


# ---------------------------------------------------------------------------------------------
# The real model's first-token distributions


REAL_CONTROLS = {
    "temperature": SamplingParams(temperature=0.7),
    "top_p": SamplingParams(top_p=0.8),
    "top_k": SamplingParams(top_k=5),
    "min_p": SamplingParams(min_p=0.05),
    "penalties": SamplingParams(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.5),
    "logit_bias": "bias the guesses",  # filled in by the test: +2 on guess 2, -3 on guess 1
    "all": SamplingParams(temperature=1.2, top_k=40, top_p=0.95, min_p=0.02, presence_penalty=0.5,
                          frequency_penalty=0.5, repetition_penalty=1.3),
}
NUM_GUESSES = 3
NUM_CELLS = 8


@pytest.fixture(scope="module")
def real_case(smollm, chat_ids):
    """(prompt ids, generated ids, guesses, target logits [1 + NUM_GUESSES, vocab]) for one context:
    the root is the last generated token, its children the model's top raw next tokens."""
    prompt = chat_ids[1]
    context = list(prompt)
    for _ in range(6):  # a few greedy tokens, so the penalties see generated tokens
        context.append(int(prompt_logits(smollm.model, context)[-1].argmax()))
    root_logits = prompt_logits(smollm.model, context)[-1]
    guesses = root_logits.topk(NUM_GUESSES).indices.tolist()
    child_logits = [prompt_logits(smollm.model, context + [g])[-1] for g in guesses]
    return prompt, context[len(prompt):], guesses, torch.stack([root_logits, *child_logits])


def _compress(rows: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """[rows, len(keep) + 1]: the kept tokens' probabilities, then the rest's total.

    Exact for point-mass guesses on kept tokens: MSS reads p only at guess tokens, and a
    rejection zeroes that token and renormalises, so every other token's probability is scaled
    alike and the bonus token's cell has the same law whether the rest is one cell or many.
    """
    kept = rows[:, keep]
    return torch.cat([kept, (1 - kept.sum(-1, keepdim=True)).clamp(min=0)], dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CONTROLS))
def test_real_model_first_token_follows_plain_sampling(name: str, real_case) -> None:
    prompt, generated, guesses, logits = real_case
    params = REAL_CONTROLS[name]
    if name == "logit_bias":
        params = SamplingParams(logit_bias=tuple(sorted({guesses[1]: 2.0, guesses[0]: -3.0}.items())))
    vocab = logits.shape[1]
    tree = TokenTree((generated[-1], *guesses), (-1,) + (0,) * NUM_GUESSES)
    seq = Sequence("real", prompt + generated, len(prompt), params, torch.Generator(), None, 0.0)
    if params.uses_history:
        seq.token_counts = TokenCounts.from_tokens(prompt, generated, vocab, torch.device("cpu"))
    rows = target_probs(speculative.target_logits(seq, tree, logits), params)  # [4, vocab] the engine's rows
    plain = rows[0]  # the root's row is plain sampling's law of the next token
    counts = None if seq.token_counts is None else seq.token_counts.output_counts[None]
    prompt_mask = None if seq.token_counts is None else seq.token_counts.prompt_mask
    assert torch.equal(plain, _processed(logits[:1], params, counts, prompt_mask)[0])

    others = [t for t in plain.argsort(descending=True).tolist() if t not in guesses]
    keep = guesses + others[: NUM_CELLS - 1 - NUM_GUESSES]
    cell_tree = TokenTree((len(keep),) + tuple(range(NUM_GUESSES)), tree.parents)  # guess i: cell i
    cell_rows = _compress(rows, keep)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    results = verify_mss_batch([cell_tree] * NUM_SAMPLES, cell_rows.repeat(NUM_SAMPLES, 1), generator)
    first = np.array([result.accepted_token_ids(cell_tree)[0] for result in results])
    assert chi_square_pvalue(first, _compress(plain[None], keep)[0]) > ALPHA
    if name in ("top_k", "logit_bias"):  # these controls change which guesses survive
        assert (plain[guesses] - torch.softmax(logits[0], -1)[guesses]).abs().max() > 0.02
