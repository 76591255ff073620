"""`umv2cli.fit` on tables drawn from planted laws: values, intervals, verdicts, the bootstrap unit."""

import numpy as np
import polars as pl
import pytest

from umv2cli import fit as F
from umv2cli import laws


def planted_loglinear(a, b, c=0.0, c0=1.5, noise=0.004, seeds=2, levels=4, rng=0) -> pl.DataFrame:
    """A levels×levels (P, m) grid, `seeds` runs each, log L = c0 + a·log P + b·log m + c·log P·log m + noise."""
    rng = np.random.default_rng(rng)
    rows = []
    for P in 2.0 ** np.arange(levels) * 1e8:
        for m in 2.0 ** np.arange(levels) * 32:
            for s in range(seeds):
                lL = c0 + a * np.log(P) + b * np.log(m) + c * np.log(P) * np.log(m) + noise * rng.standard_normal()
                rows.append(dict(run_id=f"P{P:g}-m{m:g}-s{s}", sparse_params=P, topm=m, activated_params=2e8,
                                 total_params=2e8 + P, tokens=4e9, flops_per_token=4e8, seed=s,
                                 loss=float(np.exp(lL))))
    return pl.DataFrame(rows)


def truth(a, b, c, runs):
    """(e_P, e_m) of the planted F1 law at the design centre."""
    lP0, lm0, *_ = F.design_centre(runs)
    return a + c * lm0, b + c * lP0


@pytest.mark.parametrize("a, b, c, expected", [
    (-0.02, -0.05, 0.001, "density outranks"),   # e_P ≈ -0.016, e_m ≈ -0.031: R ≈ 2
    (-0.05, -0.01, 0.0, "count outranks"),       # R = 0.2
])
def test_planted_loglinear_recovers_params_and_verdict(a, b, c, expected):
    runs = F.runs_from_frame(planted_loglinear(a, b, c))
    r = F.run_fit(runs, "loglinear", n_boot=500, seed=1, compare=False)
    eP, em = truth(a, b, c, runs)
    for name, value in {"a": a, "b": b, "c": c}.items():
        lo, hi = r["params_ci"][name]
        assert lo <= value <= hi, (name, value, lo, hi)
    assert r["e_P_ci"][0] <= eP <= r["e_P_ci"][1] and r["e_m_ci"][0] <= em <= r["e_m_ci"][1]
    assert r["R_ci"][0] <= em / eP <= r["R_ci"][1]
    assert r["verdict"] == expected and r["converged"] and r["bootstrap"]["failed"] == 0
    assert r["start_objective_spread"] < 1e-12 * max(1.0, r["objective"]) + 1e-15
    # noise is 0.004 in log L, so about 0.004·L in loss (16 pairs of seeds: 16 dof, ±18% per sd)
    assert r["n_runs"] == 32 and r["seed_sigma"] == pytest.approx(0.004 * runs.loss.mean(), rel=0.5)


def test_equal_elasticities_with_big_noise_is_inconclusive():
    r = F.run_fit(F.runs_from_frame(planted_loglinear(-0.02, -0.02, noise=0.03)), "loglinear", 500, 0,
                  compare=False)
    assert r["verdict"] == "inconclusive" and r["R_ci"][0] < 1 < r["R_ci"][1]


def test_interval_of_e_m_covers_the_truth_about_95_percent():
    # 100 independent tables, B = 200 each. If the 95% interval is honest, the number of covering draws is
    # Binomial(100, 0.95): mean 95, sd 2.2, so P(< 85) is below 1e-4 — a failure means undercoverage, not luck.
    a, b, c, covered = -0.02, -0.04, 0.001, 0
    for draw in range(100):
        runs = F.runs_from_frame(planted_loglinear(a, b, c, noise=0.01, seeds=2, rng=1000 + draw))
        centre = F.design_centre(runs)
        y = np.log(runs.loss)
        fit = laws.fit_loglinear(np.log(runs.P), np.log(runs.m), None, y, centre, check_starts=False)
        boot = F.bootstrap(runs, "loglinear", fit, centre, 200, seed=draw)
        lo, hi = F.percentile_ci(boot[:, 1])
        covered += lo <= truth(a, b, c, runs)[1] <= hi
    assert covered >= 85, covered


def test_bootstrap_resamples_runs_so_duplicated_checkpoints_do_not_shrink_the_interval():
    df = planted_loglinear(-0.02, -0.05, 0.001, noise=0.01)
    doubled = pl.concat([df, df])  # every run reported twice (two checkpoints of one run_id)
    one = F.run_fit(F.runs_from_frame(df), "loglinear", 300, 7, compare=False)
    two = F.run_fit(F.runs_from_frame(doubled), "loglinear", 300, 7, compare=False)
    assert two["n_runs"] == one["n_runs"] == 32
    assert two["R_ci"] == pytest.approx(one["R_ci"], rel=1e-6)
    assert two["e_m_ci"] == pytest.approx(one["e_m_ci"], rel=1e-6)


def test_bootstrap_weights_move_whole_runs_and_keep_the_run_count():
    df = planted_loglinear(-0.02, -0.05)
    runs = F.runs_from_frame(pl.concat([df, df]))
    W = F.bootstrap_weights(runs, 50, seed=3)
    for r in range(len(runs.run_ids)):
        rows = np.flatnonzero(runs.run == r)
        assert (W[:, rows] == W[:, rows[:1]]).all()  # a run's rows are drawn together
    per_run = np.zeros((50, len(runs.run_ids)))
    per_run[:, runs.run] = W
    assert (per_run.sum(axis=1) == 32).all()  # 16 configs × 2 seeds drawn each time


def test_seed_sigma_is_pooled_std_and_none_without_replicates():
    df = planted_loglinear(-0.02, -0.05, noise=0.0, seeds=1)
    assert F.seed_sigma(F.runs_from_frame(df)) is None
    twin = df.with_columns(pl.col("run_id") + "-b", pl.col("loss") + 0.02, pl.col("seed") + 1)
    # each config has losses (L, L + 0.02): std with ddof 1 = 0.02/√2
    assert F.seed_sigma(F.runs_from_frame(pl.concat([df, twin]))) == pytest.approx(0.02 / np.sqrt(2))


def test_iso_cost_pairs_favour_density_when_planted_so():
    runs = F.runs_from_frame(planted_loglinear(-0.01, -0.05, noise=0.001))
    pairs, sign = F.iso_cost_pairs(runs, 200, 0)
    assert len(pairs) == 14 and sign["density_wins"] == 14 and sign["p_value"] < 1e-3  # k=2: 9, k=4: 4, k=8: 1
    p = next(p for p in pairs if p["k"] == 2 and p["density"]["P"] == 1e8 and p["density"]["m"] == 64)
    expected = np.exp(1.5 - 0.01 * np.log(1e8) - 0.05 * np.log(64)) - np.exp(1.5 - 0.01 * np.log(2e8) - 0.05 * np.log(32))
    assert p["delta_loss"] == pytest.approx(expected, abs=0.01) and p["delta_ci"][1] < 0


def planted_chinchilla(rng=0, noise=0.003) -> pl.DataFrame:
    rng = np.random.default_rng(rng)
    rows = []
    for N in [1e7, 2e7, 4e7, 8e7, 1.6e8, 3.2e8]:
        for D in [1e9, 3e9, 9e9]:
            L = (1.8 + 400 * N ** -0.34 + 2000 * D ** -0.36) * np.exp(noise * rng.standard_normal())
            rows.append(dict(run_id=f"{N:g}-{D:g}", sparse_params=0, topm=0, activated_params=N, total_params=N,
                             tokens=D, flops_per_token=2 * N, seed=0, loss=L))
    return pl.DataFrame(rows)


def test_planted_chinchilla_exponents_inside_intervals_and_deterministic_across_workers():
    runs = F.runs_from_frame(planted_chinchilla())
    r = F.run_fit(runs, "chinchilla", n_boot=40, seed=2, compare=False)
    for name, value in {"E": 1.8, "A": 400, "alpha": 0.34, "B": 2000, "beta": 0.36}.items():
        lo, hi = r["params_ci"][name]
        assert lo <= value <= hi, (name, value, lo, hi)
    assert r["params"]["alpha"] == pytest.approx(0.34, abs=0.05) and r["converged"]
    assert r["e_m"] is None and r["verdict"] == "inconclusive" and r["heldout_rmse"] < 0.05
    centre = F.design_centre(runs)
    fit = F.fit_form(runs, "chinchilla", centre)
    one = F.bootstrap(runs, "chinchilla", fit, centre, 8, seed=5, workers=1)
    two = F.bootstrap(runs, "chinchilla", fit, centre, 8, seed=5, workers=2)
    np.testing.assert_array_equal(one, two)


def test_run_fit_is_deterministic_for_a_seed():
    runs = F.runs_from_frame(planted_loglinear(-0.02, -0.05, noise=0.01))
    assert F.run_fit(runs, "loglinear", 200, 11) == F.run_fit(runs, "loglinear", 200, 11)
    assert F.run_fit(runs, "loglinear", 200, 11)["R_ci"] != F.run_fit(runs, "loglinear", 200, 12)["R_ci"]
