"""Memory-intensive synthetic tasks: open stand-ins for the paper's long-context suite.

The paper's suite (paper-notes §6.1, [V2] Tables 2 and 9) is proprietary; UltraMemV2's largest gains
over MoE are on long-context memorization (+1.6), multi-round memorization (+6.2) and in-context
learning (+7.9). Each task below is a pure function of (n, seq_len, vocab_size, seed) returning
`(tokens_NT, answer_NT)`: int64 token ids and a bool mask of the positions t whose NEXT token
tokens[t + 1] is graded. The metric (`task_accuracy`) is greedy argmax accuracy over the whole
vocabulary at those positions.

Token ids. 0..7 are reserved markers, the same for every vocab_size ≥ 64: PAD 0 (after the
end, never graded), BOS 1 (position 0 of every sequence), SEP 2 (opens the query section), ROUND 3
(opens a binding round); 4..7 are unused. Content ids 8..vocab_size-1 split into a key half
(8 .. 8 + (V-8)//2 - 1) and a value half (the rest); answers are always value ids, the token
before an answer always a key id, so copying the input never scores. Below, k·/x· are key ids,
v·/y· value ids, and [·] marks a graded position (its next token is the answer).

1. `associative_recall`: long-context memorization. Multi-query associative recall (MQAR, Arora
   et al. 2023, "Zoology"). P distinct keys bound to P distinct values, then SEP and every key once
   more in a random order; the answer is its value.
       BOS k1 v1 k2 v2 k3 v3 SEP [k2] v2 [k3] v3 [k1] v1 PAD…
   P = min((seq_len - 2) // 4, #keys). Chance: 1 / #values (a guess over the value half).
2. `multi_round_recall`: multi-round memorization. A set of P keys is bound in round 1, then each
   later round re-binds a random half of them (m = P // 2) to a NEW value; after the rounds every key
   is queried once and the answer is its LATEST binding (which may be any round's, so position alone
   does not give it away).
       BOS ROUND k1 v1 k2 v2 ROUND k2 v3 ROUND k1 v4 SEP [k2] v3 [k1] v4 PAD…
   P = clamp(seq_len // 16, 2, #keys); the rounds fill the context (about ten at any seq_len).
   Chance: 1 / #values. A model that returns the first binding instead of the latest scores about
   1 / (number of bindings of the key), so below 0.5 once most keys are re-bound.
3. `in_context_mapping`: in-context learning. Few-shot symbol mapping with a fresh random bijection
   f per sequence from a small input alphabet X (the first A key ids) onto an output alphabet Y (the
   first A value ids). The sequence is a stream of E = (seq_len - 1) // 2 demonstrations "x f(x)" with
   x uniform over X; a demonstration is graded when its x was shown before, so f(x) is inferable
   only from the context, never from training.
       BOS x1 y3 x2 y1 [x1] y3 x3 y2 [x2] y1 …
   A = clamp(E // 4, 2, #keys) (each symbol is shown about four times). Chance: 1 / A (a guess
   over Y; the mapping changes with every sequence).

Chances use the answer alphabet of the task; `chance_accuracy` returns them.
"""

from collections.abc import Callable

import torch
import torch.nn as nn

from umv2cli.errors import UserError

# N sequences  T positions  P keys of a sequence  R rounds  M keys re-bound per round
# E demonstrations  A in-context alphabet  K key alphabet  W value alphabet  B batch

PAD, BOS, SEP, ROUND = 0, 1, 2, 3
N_MARKERS = 8
"""Ids 0..7 are markers (4..7 unused, kept free); content ids start at 8."""
MIN_VOCAB = 12
"""Smallest vocab_size: two keys and two values. Tests use small ones; any model has ≥ 64."""


# ----------------------------------------------------------------------------------------------
# helpers


def _alphabets(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ids [K] and value ids [W]: the two halves of the content ids 8..vocab_size-1."""
    half = N_MARKERS + (vocab_size - N_MARKERS) // 2
    return torch.arange(N_MARKERS, half), torch.arange(half, vocab_size)


def _check(task: str, n: int, seq_len: int, vocab_size: int, min_seq_len: int) -> None:
    problems = []
    if n < 1:
        problems.append(f"{task}: n={n}: must be ≥ 1")
    if vocab_size < MIN_VOCAB:
        problems.append(f"{task}: vocab_size={vocab_size}: must be ≥ {MIN_VOCAB} (ids 0..7 are markers)")
    if seq_len < min_seq_len:
        problems.append(f"{task}: seq_len={seq_len}: must be ≥ {min_seq_len}")
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
    _check("associative_recall", n, seq_len, vocab_size, min_seq_len=6)
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
    _check("multi_round_recall", n, seq_len, vocab_size, min_seq_len=18)  # P = 2, two rounds
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
    _check("in_context_mapping", n, seq_len, vocab_size, min_seq_len=5)  # two demonstrations
    g = torch.Generator().manual_seed(seed)
    keys_K, values_W = _alphabets(vocab_size)
    e, a = mapping_sizes(seq_len, vocab_size)
    f_NA = values_W[:a][_perms(g, n, a)]         # f(X[i]) = f_NA[:, i]
    i_NE = torch.randint(a, (n, e), generator=g)  # input symbol index of each demonstration
    seen_NEA = torch.nn.functional.one_hot(i_NE, a).cumsum(dim=1) > 1  # shown before, counting itself
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


def chance_accuracy(task: str, vocab_size: int, seq_len: int) -> float:
    """Accuracy of a uniform guess over the task's answer alphabet (module docstring)."""
    _task(task)
    if task == "in_context_mapping":
        return 1 / mapping_sizes(seq_len, vocab_size)[1]
    return 1 / len(_alphabets(vocab_size)[1])


# ----------------------------------------------------------------------------------------------
# accuracy


def _task(task: str) -> Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    if task not in TASKS:
        raise UserError(f"task {task!r}: unknown; one of {', '.join(TASKS)}")
    return TASKS[task]


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

