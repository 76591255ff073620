"""The memory tasks (evals.py): determinism, format, answers recomputed from the tokens, the metric,
chance for an untrained model, and ≥ 0.9 for a tiny UltraMemV2 model trained on each task."""

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from umv2cli.errors import UserError
from umv2cli.evals import (BOS, PAD, ROUND, SEP, TASKS, chance_accuracy, mapping_sizes, memory_task_accuracies,
                           multi_round_sizes, recall_pairs, task_accuracy)
from umv2cli.model.presets import get_preset
from umv2cli.model.transformer import build_model

torch.set_num_threads(2)

SIZES = [(16, 32), (64, 48), (512, 128), (50304, 1024)]  # (vocab_size, seq_len): test size … OLMoE vocab


def key_value_ids(vocab_size: int) -> tuple[range, range]:
    """The documented split: markers 0..7, keys the first half of 8..V-1, values the rest."""
    half = 8 + (vocab_size - 8) // 2
    return range(8, half), range(half, vocab_size)


def rows(task: str, n: int, seq_len: int, vocab_size: int, seed: int):
    tokens, answer = TASKS[task](n, seq_len, vocab_size, seed)
    return tokens.tolist(), answer.tolist()


# ----------------------------------------------------------------------------------------------
# generators


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_identical_tensors_and_another_seed_different_ones(task):
    a_tokens, a_answer = TASKS[task](8, 64, 64, 3)
    b_tokens, b_answer = TASKS[task](8, 64, 64, 3)
    c_tokens, _ = TASKS[task](8, 64, 64, 4)
    assert torch.equal(a_tokens, b_tokens) and torch.equal(a_answer, b_answer)
    assert not torch.equal(a_tokens, c_tokens)
    assert a_tokens.dtype == torch.int64 and a_answer.dtype == torch.bool and a_tokens.shape == (8, 64)


@pytest.mark.parametrize("vocab_size, seq_len", SIZES)
@pytest.mark.parametrize("task", TASKS)
def test_ids_stay_in_range_and_graded_keys_precede_value_answers(task, vocab_size, seq_len):
    tokens, answer = TASKS[task](32, seq_len, vocab_size, 0)
    keys, values = key_value_ids(vocab_size)
    assert tokens.min() >= 0 and tokens.max() < vocab_size
    assert (tokens[:, 0] == BOS).all()
    graded, following = tokens[:, :-1][answer[:, :-1]], tokens[:, 1:][answer[:, :-1]]
    assert not answer[:, -1].any() and answer.sum() > 0
    assert ((graded >= keys.start) & (graded < keys.stop)).all()        # a key is asked …
    assert ((following >= values.start) & (following < values.stop)).all()  # … and a value answers
    for row in tokens.tolist():  # PAD only as a tail
        assert PAD not in row[:max(i for i, t in enumerate(row) if t != PAD)]


def test_markers_sit_where_documented():
    for row in rows("associative_recall", 4, 48, 64, 0)[0]:
        p = recall_pairs(48, 64)
        assert row.count(SEP) == 1 and row.index(SEP) == 1 + 2 * p and ROUND not in row
    p, m, rounds = multi_round_sizes(64, 64)
    for row in rows("multi_round_recall", 4, 64, 64, 0)[0]:
        rounds_at = [i for i, t in enumerate(row) if t == ROUND]
        assert len(rounds_at) == rounds == row.count(SEP) and rounds_at[0] == 1
        first, later = 2 + 4 * p, 2 + 2 * m + 2 * p  # ROUND pairs SEP queries
        assert [b - a for a, b in zip(rounds_at, rounds_at[1:])] == [first] + [later] * (rounds - 2)
    for row in rows("in_context_mapping", 4, 48, 64, 0)[0]:
        assert SEP not in row and ROUND not in row


def test_associative_recall_answer_is_the_value_bound_to_the_queried_key():
    tokens, answer = rows("associative_recall", 64, 64, 64, 1)
    for row, graded in zip(tokens, answer):
        sep = row.index(SEP)
        binding = dict(zip(row[1:sep:2], row[2:sep:2]))
        assert len(binding) == (sep - 1) // 2  # keys are distinct
        asked = [t for t in range(len(row)) if graded[t]]
        assert asked == list(range(sep + 1, sep + 1 + 2 * len(binding), 2))
        assert all(row[t + 1] == binding[row[t]] for t in asked)


def test_multi_round_answer_is_the_latest_binding_and_often_not_the_first():
    tokens, answer = rows("multi_round_recall", 64, 128, 64, 1)
    stale = total = 0
    for row, graded in zip(tokens, answer):
        latest, first, section = {}, {}, None
        for t in range(1, len(row) - 1):
            if row[t] in (ROUND, SEP, PAD):
                section, parity = row[t], t + 1
            elif section == ROUND and (t - parity) % 2 == 0:  # a binding pair k v
                latest[row[t]] = row[t + 1]
                first.setdefault(row[t], row[t + 1])
            assert graded[t] == (section == SEP and (t - parity) % 2 == 0)
            if graded[t]:
                assert row[t + 1] == latest[row[t]]
                stale += row[t + 1] != first[row[t]]
                total += 1
    assert stale / total > 0.3  # the latest binding matters: answering the first one fails here


def test_in_context_mapping_answer_follows_the_sequence_own_bijection_on_repeats():
    tokens, answer = rows("in_context_mapping", 64, 64, 64, 1)
    _, a = mapping_sizes(64, 64)
    for row, graded in zip(tokens, answer):
        f, seen = {}, set()
        for t in range(1, len(row) - 1, 2):
            x, y = row[t], row[t + 1]
            assert f.setdefault(x, y) == y  # one f per sequence …
            assert graded[t] == (x in seen)  # … graded from the second showing on
            seen.add(x)
        assert len(set(f.values())) == len(f) <= a  # … and injective on an alphabet of A
    first_rows = [tuple(r[1:2 * a + 1]) for r in tokens]
    assert len(set(first_rows)) > 1  # f (and the order) change with the sequence


def test_chance_levels_and_bad_arguments():
    assert chance_accuracy("associative_recall", 64, 48) == 1 / 28
    assert chance_accuracy("multi_round_recall", 512, 128) == 1 / 252
    assert chance_accuracy("in_context_mapping", 64, 40) == 1 / mapping_sizes(40, 64)[1] == 1 / 4
    with pytest.raises(UserError, match="unknown"):
        chance_accuracy("needle", 64, 48)
    with pytest.raises(UserError, match="vocab_size=8"):
        TASKS["associative_recall"](4, 48, 8, 0)
    with pytest.raises(UserError, match="seq_len=10"):
        TASKS["multi_round_recall"](4, 10, 64, 0)


# ----------------------------------------------------------------------------------------------
# the metric


class Oracle(nn.Module):
    """Non-causal stand-in: predicts token t + 1 at t (`shift=1`) or copies token t (`shift=0`)."""

    def __init__(self, shift: int, vocab_size: int = 64):
        super().__init__()
        self.shift, self.vocab_size = shift, vocab_size
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx_BT):
        target_BT = torch.roll(idx_BT, -self.shift, dims=1)
        return F.one_hot(target_BT, self.vocab_size).float() + 0 * self.weight, self.weight.sum()


def test_accuracy_grades_the_next_token_at_graded_positions_only():
    for task in TASKS:
        assert task_accuracy(Oracle(1), task, n=20, seq_len=48, vocab_size=64, seed=0, batch_size=7) == 1.0
        assert task_accuracy(Oracle(0), task, n=20, seq_len=48, vocab_size=64, seed=0) == 0.0


def test_accuracy_restores_the_mode_and_builds_no_graph():
    model = build_model(get_preset("tiny-ultramemv2"), seed=0)
    model.train()
    task_accuracy(model, "associative_recall", n=4, seq_len=32, vocab_size=64, seed=0)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    accuracies = memory_task_accuracies(model, vocab_size=64, seq_len=32, seed=0, n=4)
    assert not model.training and list(accuracies) == list(TASKS)
    assert accuracies["in_context_mapping"] == task_accuracy(
        model, "in_context_mapping", n=4, seq_len=32, vocab_size=64, seed=0)


def test_accuracy_refuses_ids_or_lengths_beyond_the_model():
    model = build_model(get_preset("tiny-ultramemv2"), seed=0)  # vocab 512, context 128
    with pytest.raises(UserError, match="vocab_size=1024"):
        task_accuracy(model, "associative_recall", n=4, seq_len=32, vocab_size=1024, seed=0)
    with pytest.raises(UserError, match="seq_len=256"):
        task_accuracy(model, "associative_recall", n=4, seq_len=256, vocab_size=512, seed=0)


# ----------------------------------------------------------------------------------------------
# an untrained model is at chance; a trained one is not

# Small alphabets keep CPU training short. The recall circuit forms within a few hundred steps when
# a sequence draws from ≤ 8 keys; with vocab 64 (28 keys) no MQAR run reached 0.9 in 800 steps.
# Steps to 0.95 over seeds (batch 32, lr 1e-3 after a 20-step warmup): associative_recall 225-300,
# multi_round_recall 200-550, in_context_mapping 175-225. lr 2e-3 stalled on the last two, hence
# max_steps = 1000. This file's seed 0 on CPU needs 250, 300 and 225 steps.
TRAIN = {  # task: (vocab_size, seq_len)
    "associative_recall": (24, 24),   # 5 pairs drawn from 8 keys and 8 values
    "multi_round_recall": (16, 32),   # 2 keys of 4, 3 rounds, 4 values
    "in_context_mapping": (64, 40),   # 19 demonstrations of a bijection on A = 4 symbols
}


@pytest.mark.parametrize("vocab_size, seq_len", [*TRAIN.values(), (512, 128)])
@pytest.mark.parametrize("task", TASKS)
def test_untrained_model_stays_near_chance(task, vocab_size, seq_len):
    # Margin: 4 binomial σ of a chance-level guesser over these graded answers (≤ 0.06 here), plus
    # 0.05 of slack for a random model that happens to prefer a few answer ids. Measured: ≤ 0.002 in
    # every case, since an untrained model with tied embeddings echoes its input, a key.
    model = build_model(get_preset("tiny-ultramemv2"), seed=0)
    chance = chance_accuracy(task, vocab_size, seq_len)
    graded = int(TASKS[task](128, seq_len, vocab_size, 5)[1].sum())
    accuracy = task_accuracy(model, task, n=128, seq_len=seq_len, vocab_size=vocab_size, seed=5)
    assert accuracy <= chance + 4 * (chance * (1 - chance) / graded) ** 0.5 + 0.05, (accuracy, chance)


def train_on_task(task: str, *, seed: int = 0, max_steps: int = 1000) -> tuple[nn.Module, list]:
    """AdamW on fresh batches of `task` (loss on the graded answers only) until 0.95 on a monitor
    set; returns the model and its (step, accuracy) curve."""
    vocab_size, seq_len = TRAIN[task]
    model = build_model(get_preset("tiny-ultramemv2"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    curve = []
    for step in range(1, max_steps + 1):
        tokens, answer = TASKS[task](32, seq_len, vocab_size, seed=100_000 * seed + step)  # fresh data
        logits, aux = model(tokens)
        graded = answer[:, :-1]
        loss = F.cross_entropy(logits[:, :-1][graded], tokens[:, 1:][graded]) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        model.refresh_rank1()
        if step % 25 == 0:
            accuracy = task_accuracy(model, task, n=64, seq_len=seq_len, vocab_size=vocab_size, seed=10_000)
            curve.append((step, round(accuracy, 3)))
            if accuracy >= 0.95:
                break
    return model, curve


@pytest.mark.parametrize("task", TASKS)
def test_tiny_ultramemv2_trained_on_the_task_reaches_90_percent_on_fresh_sequences(task):
    start = time.perf_counter()
    model, curve = train_on_task(task)
    vocab_size, seq_len = TRAIN[task]
    fresh = task_accuracy(model, task, n=256, seq_len=seq_len, vocab_size=vocab_size, seed=20_000)
    assert fresh >= 0.9, (f"{task}: {fresh:.3f} on fresh sequences after {curve[-1][0]} steps "
                          f"({time.perf_counter() - start:.0f} s); curve (step, monitor accuracy): {curve}")
