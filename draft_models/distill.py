"""Training a draft on the target's distributions (knowledge distillation, teacher forcing).

Loss at every row r (a position whose next token the target generated):

    loss = KL(p_target(. | x_<r) || p_draft(. | x_<r)) + ce_weight * CE(p_draft, argmax p_target)

with the full 49k-token distributions: the target's logits are recomputed each step from its
stored final hidden state through the (shared) LM head, so nothing is truncated to a top-k.
Batches draw sequences with probability prompt_weight * rows (uniform weights: every row
equally likely) until ``batch_tokens`` real tokens. AdamW on the draft's own parameters (fp32
masters; bf16 autocast on CUDA), linear warm-up then cosine decay, gradient clipping.

A feature draft (``feature_draft``) is unrolled ``feature_passes`` depths deep (pass k reads
pass k - 1's predicted states, ``dense_forward.feature_passes``): the loss is the mean of every
pass's loss above plus ``feature_weight`` * smooth-L1 between its predicted states and the
target's, so the draft learns to read its own predictions as it will in a draft tree.

The schedule's progress is max(step / max_steps, elapsed / time_limit_s), so the learning
rate reaches its floor whichever limit comes first. The weights kept at the end are those of
the evaluation (every ``eval_every`` steps and the last step) with the best top-1 agreement
on the validation sequences.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from draft_models.dense_forward import causal_hidden, feature_passes, pad_batch, pad_states
from draft_models.distill_data import TeacherSet
from draft_models.evaluate import draft_ranks
from draft_models.feature_draft import FeatureDraft
from draft_models.small_draft import DraftSpec, own_tensors
from specserve.errors import SpecserveError
from specserve.models.llama import LlamaForCausalLM
from specserve.models.loader import LoadedModel

LOSS_CHUNK_ROWS = 4096  # rows whose full-vocabulary logits exist at once (backward_distill)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 3000
    batch_tokens: int = 16384  # real tokens (prompt + output) per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ce_weight: float = 0.1
    seed: int = 0
    eval_every: int = 200
    feature_passes: int = 4  # feature drafts: depths unrolled in training
    feature_weight: float = 0.5  # feature drafts: weight of the state regression

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_tokens < 1 or self.eval_every < 1 or self.feature_passes < 1:
            raise SpecserveError("steps, batch tokens, eval_every and feature passes must be positive")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise SpecserveError("lr must be positive and min_lr_ratio within [0, 1]")


@dataclass
class TrainResult:
    steps: int = 0
    tokens_seen: int = 0  # real tokens through the draft (padding excluded)
    rows_seen: int = 0  # loss rows
    losses: list[float] = field(default_factory=list)  # per step
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 agreement)
    best_step: int = 0
    wall_s: float = 0.0
    stopped_by: str = "steps"


def lr_factor(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` as progress -> 1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def distill_loss(
    draft_logits: torch.Tensor,  # [rows, vocab]
    target_logits: torch.Tensor,  # [rows, vocab]
    target_top1: torch.Tensor,  # [rows] int64
    ce_weight: float,
) -> torch.Tensor:
    return _loss_from_log_target(draft_logits, F.log_softmax(target_logits.float(), dim=-1), target_top1, ce_weight)


def _loss_from_log_target(
    draft_logits: torch.Tensor,  # [rows, vocab]
    log_target: torch.Tensor,  # [rows, vocab] float32, the target's log-probabilities
    target_top1: torch.Tensor,  # [rows] int64
    ce_weight: float,
) -> torch.Tensor:
    log_draft = F.log_softmax(draft_logits.float(), dim=-1)
    kl = F.kl_div(log_draft, log_target, log_target=True, reduction="batchmean")
    return kl + ce_weight * F.nll_loss(log_draft, target_top1) if ce_weight else kl


def backward_distill(
    draft: LlamaForCausalLM,
    target_model: LlamaForCausalLM,
    target_hidden: torch.Tensor,  # [rows, hidden_size] the target's final-norm states
    target_top1: torch.Tensor,  # [rows] int64
    predicted: list[torch.Tensor],  # per unrolled pass [rows, hidden_size], in the draft's graph
    cfg: TrainConfig,
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext(),
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """The step's loss (module docstring: the passes' mean distillation loss, plus the state
    regression for a feature draft), returned detached, with its gradients accumulated into the
    draft's parameters. The full-vocabulary logits exist for ``chunk_rows`` rows at a time, not
    the batch's (16k rows x 49k tokens in float32 is 3.2 GB a tensor): each chunk's loss is
    backpropagated to a detached copy of the predicted states, and those gradients then run
    through the draft once. Equal to one backward of the whole loss up to float summation order."""
    leaves = [hidden.detach().requires_grad_() for hidden in predicted]
    num_rows = target_hidden.shape[0]
    value = torch.zeros((), device=target_hidden.device)
    for begin in range(0, num_rows, chunk_rows):
        end = min(begin + chunk_rows, num_rows)
        with torch.no_grad():  # the target's side once per chunk, for every pass
            log_target = F.log_softmax(target_model.compute_logits(target_hidden[begin:end]).float(), dim=-1)
        for leaf in leaves:
            with autocast:
                draft_logits = draft.compute_logits(leaf[begin:end])
            part = _loss_from_log_target(draft_logits, log_target, target_top1[begin:end], cfg.ce_weight)
            part = part * ((end - begin) / (num_rows * len(leaves)))  # batchmean over all rows and passes
            part.backward()
            value += part.detach()
    outputs, grads = list(predicted), [leaf.grad for leaf in leaves]
    if isinstance(draft, FeatureDraft) and cfg.feature_weight:
        regression = cfg.feature_weight * sum(
            F.smooth_l1_loss(hidden.float(), target_hidden.float()) for hidden in predicted
        ) / len(predicted)
        outputs.append(regression)
        grads.append(None)  # a scalar: d loss / d loss = 1
        value += regression.detach()
    torch.autograd.backward(outputs, grads)
    return value


def sample_batch(teacher: TeacherSet, weights: torch.Tensor, batch_tokens: int, generator: torch.Generator) -> list[int]:
    """Sequences drawn with replacement by ``weights`` [num_seqs] until batch_tokens real tokens."""
    mean_len = sum(len(x) for x in teacher.input_ids) / teacher.num_seqs
    draws = torch.multinomial(weights, max(1, int(2 * batch_tokens / mean_len) + 1), True, generator=generator)
    chosen, total = [], 0
    for seq in draws.tolist():
        chosen.append(seq)
        total += len(teacher.input_ids[seq])
        if total >= batch_tokens:
            break
    return chosen


def _rows(teacher: TeacherSet, seqs: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into the [batch * width] draft rows and the teacher rows, in the same order."""
    flat, rows = [], []
    for b, s in enumerate(seqs):
        count = teacher.rows_of(s)
        start = b * width + teacher.loss_starts[s]
        flat.append(torch.arange(start, start + count))
        rows.append(torch.arange(teacher.cu_rows[s], teacher.cu_rows[s + 1]))
    return torch.cat(flat), torch.cat(rows)


def train_draft(
    draft: LlamaForCausalLM,
    spec: DraftSpec,
    target: LoadedModel,
    teacher: TeacherSet,
    seq_weights: torch.Tensor,  # [num_seqs] float, sampling weight of each training sequence
    validation: TeacherSet,
    cfg: TrainConfig,
    time_limit_s: float,
) -> TrainResult:
    """Train ``draft``'s own parameters in place; on return they hold the best validated weights,
    in the target's dtype, with requires_grad off."""
    start = time.perf_counter()
    device = target.device
    own = own_tensors(draft, spec)
    for p in own.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    groups = [{"params": [p for n, p in own.items() if not n.startswith("fc.")], "lr_scale": 1.0}]
    if isinstance(draft, FeatureDraft):  # fc at its own rate (fc_lr_scale)
        groups.append({"params": [p for n, p in own.items() if n.startswith("fc.")],
                       "lr_scale": fc_lr_scale(draft, teacher)})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    use_autocast = target.dtype != torch.float32  # (a bf16 target on the CPU runs this path too)
    autocast = torch.autocast(device.type, dtype=target.dtype) if use_autocast else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(cfg.seed)
    weights = (seq_weights * torch.tensor([teacher.rows_of(s) for s in range(teacher.num_seqs)])).double()
    result = TrainResult()
    pending: list[torch.Tensor] = []  # this group's losses, still on the device
    best = (-1.0, {})
    try:
        for step in range(cfg.max_steps):
            elapsed = time.perf_counter() - start
            if elapsed >= time_limit_s:
                result.stopped_by = "time"
                break
            progress = max(step / cfg.max_steps, elapsed / time_limit_s)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(progress, step, cfg)
            seqs = sample_batch(teacher, weights, cfg.batch_tokens, generator)
            input_ids = pad_batch([teacher.input_ids[s] for s in seqs], device)
            flat, rows = _rows(teacher, seqs, input_ids.shape[1])
            rows = rows.to(device)
            with autocast:
                if isinstance(draft, FeatureDraft):
                    states = pad_states([teacher.states[s] for s in seqs])
                    passes = feature_passes(draft, input_ids, states, cfg.feature_passes)
                else:
                    passes = [causal_hidden(draft, input_ids)]
                predicted = [hidden.flatten(0, 1)[flat.to(device)] for hidden in passes]
            optimizer.zero_grad(set_to_none=True)
            loss = backward_distill(draft, target.model, teacher.hidden[rows], teacher.top1[rows], predicted, cfg,
                                    autocast)
            torch.nn.utils.clip_grad_norm_(own.values(), cfg.grad_clip)
            optimizer.step()
            result.steps = step + 1
            pending.append(loss.detach())  # read back in groups: a .item() per step would stall the host
            result.tokens_seen += sum(len(teacher.input_ids[s]) for s in seqs)
            result.rows_seen += len(rows)
            if result.steps % cfg.eval_every == 0:
                _flush(pending, result)
                best = _validate(draft, validation, cfg, result, best, own)
        _flush(pending, result)
        if not result.validation or result.validation[-1][0] != result.steps:
            best = _validate(draft, validation, cfg, result, best, own)
    finally:
        with torch.no_grad():
            for name, p in own.items():
                if best[1]:
                    p.data = best[1][name].to(device)
                p.data = p.data.to(target.dtype)
                p.requires_grad_(False)
                p.grad = None
    result.wall_s = time.perf_counter() - start
    return result


def fc_lr_scale(draft: LlamaForCausalLM, teacher: TeacherSet) -> float:
    """A feature draft's ``fc`` learns at lr x rms(embedding) / rms(target state).

    Adam moves every weight by about lr a step whatever its input, so the state half of ``fc``,
    whose inputs are the target's final-norm states (SmolLM2: rms 2.0 against the embedding's
    0.13), would change the draft's input ~16x faster than the token half: warm-started from a
    token draft, the first steps drowned the token it reads (loss 3.0 -> 5.0 in the tiny run).
    The whole of ``fc`` (one Parameter: its token half and bias too) takes the scaled rate,
    which is how ``smollm2-feature11-1`` was trained; the layers keep the full rate.
    """
    embed_rms = draft.embed_tokens.weight.float().pow(2).mean().sqrt()
    sample = torch.cat([x.float() for x in teacher.states[:64]]) if teacher.states else teacher.hidden.float()
    return float(embed_rms / sample.pow(2).mean().sqrt().clamp_min(1e-6))


def _flush(pending: list[torch.Tensor], result: TrainResult) -> None:
    """Move the group's losses to ``result.losses`` (one device-to-host read) and empty it."""
    if pending:
        result.losses.extend(torch.stack(pending).float().tolist())
        pending.clear()


def _validate(draft, validation: TeacherSet, cfg: TrainConfig, result: TrainResult, best, own):
    if validation.num_seqs == 0 or result.steps == 0:
        return best
    ranks = draft_ranks(draft, validation, cfg.batch_tokens)  # a feature draft's: every depth's
    agreement = float(torch.cat([r.flatten() for r in ranks]).eq(0).float().mean())
    result.validation.append((result.steps, round(agreement, 5)))
    if agreement > best[0]:
        result.best_step = result.steps
        return agreement, {name: p.detach().to("cpu", copy=True) for name, p in own.items()}
    return best
