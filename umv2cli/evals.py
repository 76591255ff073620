"""Memory-intensive synthetic tasks: open stand-ins for the paper's long-context suite.

The paper's suite (docs/fidelity.md §7; its Tables 2 and 9) is proprietary. Its three memory columns
are where UltraMemV2 gains most over MoE: long-context memorization (+1.6), multi-round memorization
(+6.2) and in-context learning (+7.9). Each task below is a pure function of (n, seq_len,
vocab_size, seed) that returns `(tokens_NT, answer_NT)`. `tokens_NT` holds int64 token ids.
`answer_NT` is a bool mask of the positions t whose NEXT token, tokens[t + 1], is graded. The
metric, `task_accuracy`, is greedy argmax accuracy over the whole vocabulary at those positions.

Token ids. Ids 0..7 are markers, the same for every vocab_size:
- PAD 0 pads the tail and is never graded.
- BOS 1 sits at position 0.
- SEP 2 opens a query section.
- ROUND 3 opens a round of bindings.
- 4..7 are unused.
The content ids 8..V-1 split into two halves: keys (8 .. 8 + (V-8)//2 - 1) and values (the rest).
A graded position always holds a key and its answer is always a value, so copying the current token
never scores. Any vocab_size ≥ 12 works; a model's vocabulary (≥ 64) gives the full alphabets, and
the tests use small ones to train quickly. In the examples below, k and x are key ids, v and y are
value ids, and [·] marks a graded position.

1. `associative_recall` stands in for long-context memorization. It is multi-query associative
   recall (MQAR; Arora et al. 2023, "Zoology"). P distinct keys are bound to values, then SEP, then
   P queries; the answer to a query is the value bound to its key.
       BOS k1 v1 k2 v2 k3 v3 SEP [k2] v2 [k3] v3 [k2] v2 PAD…
   P = min((seq_len - 2) // 4, #keys). Values are drawn with replacement and queries with
   replacement. If every key were queried once, a model could score H(P)/P by never repeating an
   answer; a tiny model does learn that shortcut and then stalls there.
   Chance: 1 / #values. A model that guesses some value from the context scores about 1 / P.
2. `multi_round_recall` stands in for multi-round memorization. Round 1 binds P keys. Each later
   round re-binds m = P // 2 of them, each to a NEW value. Every round ends with SEP and P queries
   (with replacement) over all P keys, and the answer is the key's LATEST binding. That binding may
   come from any earlier round or from an earlier query's answer.
       BOS ROUND k1 v1 k2 v2 SEP [k2] v2 [k1] v1 ROUND k2 v3 SEP [k2] v3 [k1] v1 ROUND k1 v4 SEP …
   P = clamp(seq_len // 32, 2, #keys). Rounds fill the context: 3 at seq_len 32, 8 at 128, 10 at
   4096. Queries after every round make the early rounds an easier curriculum. With queries only at
   the end, a tiny model stalled at the "last round's value" shortcut.
   Chance: 1 / #values. Returning the first binding fails on most queries after round 1.
3. `in_context_mapping` stands in for in-context learning. It is few-shot symbol mapping. Each
   sequence draws a fresh random bijection f from a small input alphabet X (the first A key ids)
   onto an output alphabet Y (the first A value ids). The sequence is a stream of
   E = (seq_len - 1) // 2 demonstrations "x f(x)", each x uniform over X. A demonstration is graded
   when its x has been shown before, so f(x) can be inferred from the context and never from
   training.
       BOS x1 y3 x2 y1 [x1] y3 x3 y2 [x2] y1 …
   A = clamp(E // 4, 2, #keys), so each symbol is shown about four times.
   Chance: 1 / A, a guess over Y; the mapping changes with every sequence.

`chance_accuracy` returns these chance levels: a uniform guess over the task's answer alphabet.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from umv2cli.errors import UserError

# N sequences  T positions  P keys of a sequence  R rounds  M keys re-bound per round
# E demonstrations  A in-context alphabet  K key alphabet  W value alphabet  B batch

PAD, BOS, SEP, ROUND = 0, 1, 2, 3
N_MARKERS = 8
"""Ids 0..7 are markers (4..7 unused, kept free); content ids start at 8."""
MIN_VOCAB = 12
"""Smallest vocab_size: two keys and two values after the 8 markers."""
MIN_SEQ_LEN = {"associative_recall": 6, "multi_round_recall": 18, "in_context_mapping": 5}
"""Each task's shortest sequence: one pair and its query; two rounds of P = 2 keys; two demonstrations."""


# ----------------------------------------------------------------------------------------------
# helpers


def _alphabets(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ids [K] and value ids [W]: the two halves of the content ids 8..vocab_size-1."""
    half = N_MARKERS + (vocab_size - N_MARKERS) // 2
    return torch.arange(N_MARKERS, half), torch.arange(half, vocab_size)


def _check(task: str, n: int, seq_len: int, vocab_size: int) -> None:
    problems = []
    if n < 1:
        problems.append(f"{task}: n={n}: must be ≥ 1")
    if vocab_size < MIN_VOCAB:
        problems.append(f"{task}: vocab_size={vocab_size}: must be ≥ {MIN_VOCAB} (ids 0..7 are markers)")
    if seq_len < MIN_SEQ_LEN[task]:
        problems.append(f"{task}: seq_len={seq_len}: must be ≥ {MIN_SEQ_LEN[task]}")
    if problems:
        raise UserError(*problems)


def _perms(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """n independent random permutations of range(k), as [n, k]."""
    return torch.rand(n, k, generator=g).argsort(dim=1)


def _interleave(a_NP: torch.Tensor, b_NP: torch.Tensor) -> torch.Tensor:
    """a1 b1 a2 b2 … as [N, 2P]."""
    return torch.stack([a_NP, b_NP], dim=2).flatten(1)


def _marker(n: int, token: int) -> torch.Tensor:
    return torch.full((n, 1), token, dtype=torch.long)


def _pad(rows_NL: torch.Tensor, graded_NL: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tokens with PAD and the mask with False to seq_len."""
    n, length = rows_NL.shape
    tokens_NT = torch.full((n, seq_len), PAD, dtype=torch.long)
    answer_NT = torch.zeros(n, seq_len, dtype=torch.bool)
    tokens_NT[:, :length], answer_NT[:, :length] = rows_NL, graded_NL
    return tokens_NT, answer_NT


def _key_positions(n: int, length: int, start: int, count: int) -> torch.Tensor:
    """Mask [n, length] with the `count` key slots start, start+2, … set: each precedes its answer."""
    graded_NL = torch.zeros(n, length, dtype=torch.bool)
    graded_NL[:, start:start + 2 * count:2] = True
    return graded_NL


# ----------------------------------------------------------------------------------------------
# sizes (shared by the generators and chance_accuracy)


def recall_pairs(seq_len: int, vocab_size: int) -> int:
    """P of `associative_recall`: BOS + 2P context + SEP + 2P queries ≤ seq_len."""
    keys_K, _ = _alphabets(vocab_size)
    return min((seq_len - 2) // 4, len(keys_K))


def multi_round_sizes(seq_len: int, vocab_size: int) -> tuple[int, int, int]:
    """(P keys, M re-bound per round, R rounds) of `multi_round_recall`: BOS, then round 1
    (ROUND + 2P bindings + SEP + 2P queries), then R - 1 rounds (ROUND + 2M + SEP + 2P) ≤ seq_len."""
    keys_K, _ = _alphabets(vocab_size)
    p = max(2, min(seq_len // 32, len(keys_K)))
    m = p // 2
    first = 1 + (2 + 2 * p + 2 * p)
    return p, m, 1 + max(0, seq_len - first) // (2 + 2 * m + 2 * p)


def mapping_sizes(seq_len: int, vocab_size: int) -> tuple[int, int]:
    """(E demonstrations, A alphabet size) of `in_context_mapping`: BOS + 2E ≤ seq_len."""
    keys_K, _ = _alphabets(vocab_size)
    e = (seq_len - 1) // 2
    return e, max(2, min(e // 4, len(keys_K)))


# ----------------------------------------------------------------------------------------------
# the three tasks


def associative_recall(n: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR (long-context memorization): P key→value pairs, SEP, every key again; answer its value."""
    _check("associative_recall", n, seq_len, vocab_size)
    g = torch.Generator().manual_seed(seed)
    keys_K, values_W = _alphabets(vocab_size)
    p = recall_pairs(seq_len, vocab_size)
    k_NP = keys_K[_perms(g, n, len(keys_K))[:, :p]]              # distinct keys
    v_NP = values_W[torch.randint(len(values_W), (n, p), generator=g)]
    q_NP = torch.randint(p, (n, p), generator=g)  # queried pair, with replacement: no elimination
    rows_NL = torch.cat([_marker(n, BOS), _interleave(k_NP, v_NP), _marker(n, SEP),
                         _interleave(k_NP.gather(1, q_NP), v_NP.gather(1, q_NP))], dim=1)
    return _pad(rows_NL, _key_positions(n, rows_NL.shape[1], 2 + 2 * p, p), seq_len)


def multi_round_recall(n: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-round memorization: keys re-bound round after round; each round's queries ask for
    the LATEST binding of any key."""
    _check("multi_round_recall", n, seq_len, vocab_size)
    g = torch.Generator().manual_seed(seed)
    keys_K, values_W = _alphabets(vocab_size)
    p, m, rounds = multi_round_sizes(seq_len, vocab_size)
    k_NP = keys_K[_perms(g, n, len(keys_K))[:, :p]]
    bound_NP = torch.zeros(n, p, dtype=torch.long)  # value index of each key's latest binding
    rows, graded = [_marker(n, BOS)], [torch.zeros(n, 1, dtype=torch.bool)]
    for r in range(rounds):
        if r == 0:  # round 1 binds every key
            slot_NS = _perms(g, n, p)
            new_NS = torch.randint(len(values_W), (n, p), generator=g)
        else:  # later rounds re-bind m of them, each to a value other than its current one
            slot_NS = _perms(g, n, p)[:, :m]
            new_NS = torch.randint(len(values_W) - 1, (n, m), generator=g)
            new_NS = new_NS + (new_NS >= bound_NP.gather(1, slot_NS)).long()
        bound_NP = bound_NP.scatter(1, slot_NS, new_NS)
        q_NP = torch.randint(p, (n, p), generator=g)  # queried keys, with replacement
        rows += [_marker(n, ROUND), _interleave(k_NP.gather(1, slot_NS), values_W[new_NS]),
                 _marker(n, SEP), _interleave(k_NP.gather(1, q_NP), values_W[bound_NP.gather(1, q_NP)])]
        bindings = 2 + 2 * slot_NS.shape[1]  # ROUND, pairs, SEP
        graded.append(_key_positions(n, bindings + 2 * p, bindings, p))
    rows_NL = torch.cat(rows, dim=1)
    return _pad(rows_NL, torch.cat(graded, dim=1), seq_len)


def in_context_mapping(n: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context learning: demonstrations x f(x) of a per-sequence bijection; repeats are graded."""
    _check("in_context_mapping", n, seq_len, vocab_size)
    g = torch.Generator().manual_seed(seed)
    keys_K, values_W = _alphabets(vocab_size)
    e, a = mapping_sizes(seq_len, vocab_size)
    f_NA = values_W[:a][_perms(g, n, a)]         # f(X[i]) = f_NA[:, i]
    i_NE = torch.randint(a, (n, e), generator=g)  # input symbol index of each demonstration
    seen_NEA = F.one_hot(i_NE, a).cumsum(dim=1) > 1  # shown before, counting itself
    repeat_NE = seen_NEA.gather(2, i_NE[:, :, None])[:, :, 0]
    rows_NL = torch.cat([_marker(n, BOS), _interleave(keys_K[:a][i_NE], f_NA.gather(1, i_NE))], dim=1)
    graded_NL = torch.zeros_like(rows_NL, dtype=torch.bool)
    graded_NL[:, 1::2] = repeat_NE
    return _pad(rows_NL, graded_NL, seq_len)


TASKS: dict[str, Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "associative_recall": associative_recall,
    "multi_round_recall": multi_round_recall,
    "in_context_mapping": in_context_mapping,
}


def check_tasks(seq_len: int, vocab_size: int) -> None:
    """`UserError` unless every task fits sequences of `seq_len` tokens over `vocab_size` ids (checked
    before a run starts, so that its first evaluation cannot fail on them)."""
    problems = []
    for make in TASKS.values():
        try:
            make(1, seq_len, vocab_size, 0)
        except UserError as e:
            problems += e.problems
    if problems:
        raise UserError(*problems)


def _task(task: str) -> Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    if task not in TASKS:
        raise UserError(f"task {task!r}: unknown; one of {', '.join(TASKS)}")
    return TASKS[task]


def chance_accuracy(task: str, vocab_size: int, seq_len: int) -> float:
    """Accuracy of a uniform guess over the task's answer alphabet (module docstring)."""
    _task(task)
    if task == "in_context_mapping":
        return 1 / mapping_sizes(seq_len, vocab_size)[1]
    return 1 / len(_alphabets(vocab_size)[1])


# ----------------------------------------------------------------------------------------------
# accuracy


def graded_hits(model: nn.Module, tokens_NT: torch.Tensor, answer_NT: torch.Tensor,
                batch_size: int = 32) -> tuple[int, int]:
    """(correct, graded): greedy argmax over the whole vocabulary at the graded positions.
    Runs as the caller left the model (mode, grad); batches go to the model's device."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(tokens_NT), batch_size):
        idx_BT = tokens_NT[start:start + batch_size].to(device)
        graded_BT = answer_NT[start:start + batch_size, :-1].to(device)  # t predicts t + 1
        logits_BTV, _ = model(idx_BT)
        hit_BT = logits_BTV[:, :-1].argmax(dim=-1) == idx_BT[:, 1:]
        correct += int((hit_BT & graded_BT).sum())
    return correct, int(answer_NT[:, :-1].sum())


def task_accuracy(model: nn.Module, task: str, *, n: int, seq_len: int, vocab_size: int, seed: int,
                  batch_size: int = 32) -> float:
    """Greedy accuracy of `model` on n fresh sequences of `task`, in eval mode and without grad;
    the model's mode is restored afterwards."""
    cfg = getattr(model, "cfg", None)  # a `Transformer`'s ModelConfig; other modules are not checked
    if cfg is not None and (vocab_size > cfg.vocab_size or seq_len > cfg.seq_len):
        raise UserError(f"{task}: vocab_size={vocab_size}, seq_len={seq_len} exceed the model's "
                        f"{cfg.vocab_size}, {cfg.seq_len}; pass at most those")
    tokens_NT, answer_NT = _task(task)(n, seq_len, vocab_size, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct, graded = graded_hits(model, tokens_NT, answer_NT, batch_size)
    finally:
        model.train(was_training)
    return correct / max(graded, 1)


def memory_task_accuracies(model: nn.Module, *, vocab_size: int, seq_len: int, seed: int,
                           n: int = 64) -> dict[str, float]:
    """`task_accuracy` of every task in `TASKS` (what the trainer logs at eval steps)."""
    return {task: task_accuracy(model, task, n=n, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
            for task in TASKS}

