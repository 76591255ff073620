"""Runs tables drawn from planted scaling laws with noise, and the truths a fit should recover.

Each table has the columns `umv2cli.fit.COLUMNS`; noise is Gaussian in log L (one draw per run). ``rounding``
moves each level of P by ±that fraction (alternating), as the planner's rounding of the table size does, with the
nominal values in grid.sparse_params and grid.topm where ``grid`` is set.
"""

import numpy as np
import polars as pl


def row(run_id, P, m, N, D, flops, seed, loss) -> dict:
    return dict(run_id=run_id, sparse_params=P, topm=m, activated_params=N, total_params=N + P, tokens=D,
                flops_per_token=flops, seed=seed, loss=float(loss))


def rounded(P, level: int, rounding: float) -> float:
    """P moved by ±``rounding`` (the sign alternates with the level), as the planner's table sizes are."""
    return P * (1 + rounding * (-1) ** level)


def with_grid(rows: list[dict], nominal: list[tuple]) -> list[dict]:
    """Rows with grid.sparse_params and grid.topm set to their nominal (P, m)."""
    return [r | {"grid.sparse_params": P, "grid.topm": m} for r, (P, m) in zip(rows, nominal)]


def planted_loglinear(a, b, c=0.0, c0=1.5, noise=0.004, seeds=2, levels=4, rng=0, rounding=0.0,
                      grid=False) -> pl.DataFrame:
    """F1: a levels×levels (P, m) grid, `seeds` runs each, log L = c0 + a·log P + b·log m + c·log P·log m."""
    rng = np.random.default_rng(rng)
    rows, nominal = [], []
    for i, P in enumerate(2.0 ** np.arange(levels) * 1e8):
        for m in 2.0 ** np.arange(levels) * 32:
            for s in range(seeds):
                Pr = rounded(P, i, rounding)
                lL = c0 + a * np.log(Pr) + b * np.log(m) + c * np.log(Pr) * np.log(m) + noise * rng.standard_normal()
                rows.append(row(f"P{P:g}-m{m:g}-s{s}", Pr, m, 2e8, 4e9, 4e8, s, np.exp(lL)))
                nominal.append((P, m))
    return pl.DataFrame(with_grid(rows, nominal) if grid else rows)


def loglinear_truth(a, b, c, centre) -> tuple[float, float]:
    """(e_P, e_m) of the planted F1 law at the design centre (log P₀, log m₀, …)."""
    return a + c * centre[1], b + c * centre[0]


CHINCHILLA = dict(E=1.8, A=400.0, alpha=0.34, B=2000.0, beta=0.36)


def dense_loss(N, D=None, p=CHINCHILLA) -> float:
    """F0: L = E + A/N^α (+ B/D^β)."""
    return p["E"] + p["A"] * N ** -p["alpha"] + (0.0 if D is None else p["B"] * D ** -p["beta"])


def planted_chinchilla(noise=0.003, rng=0) -> pl.DataFrame:
    """F0 on a dense ladder: 6 sizes × 3 token budgets, FLOPs/token = 2N."""
    rng = np.random.default_rng(rng)
    return pl.DataFrame([row(f"{N:g}-{D:g}", 0, 0, N, D, 2 * N, 0,
                             dense_loss(N, D) * np.exp(noise * rng.standard_normal()))
                         for N in [1e7, 2e7, 4e7, 8e7, 1.6e8, 3.2e8] for D in [1e9, 3e9, 9e9]])


def planted_leverage(u, v, c0, noise=0.002, seeds=2, rng=0, rounding=0.0, floor=()) -> pl.DataFrame:
    """F4: a dense ladder (6 sizes, L = E + A/N^α, FLOPs/token = 6N) and a 4×4 (P, m) grid at N_a = 2e7 whose runs
    have efficiency leverage EL = e^c0·P^u·m^v: each reaches the loss of a dense model with EL times its FLOPs.
    The configurations (P, m) in ``floor`` get a loss below the ladder's floor E instead (no dense model reaches
    it)."""
    rng = np.random.default_rng(rng)
    rows = [row(f"dense-{N:g}", 0, 0, N, 4e9, 6 * N, 0, dense_loss(N) * np.exp(noise * rng.standard_normal()))
            for N in [1e7, 2e7, 4e7, 8e7, 1.6e8, 3.2e8]]
    Na, flops = 2e7, 6 * 2e7 * 1.05  # the memory layer adds 5% FLOPs
    for i, P in enumerate(2.0 ** np.arange(4) * 1e8):
        for m in 2.0 ** np.arange(4) * 32:
            Pr = rounded(P, i, rounding)
            N_equiv = np.exp(c0 + u * np.log(Pr) + v * np.log(m)) * flops / 6
            loss = 0.97 * CHINCHILLA["E"] if (P, m) in floor else dense_loss(N_equiv)
            for s in range(seeds):
                rows.append(row(f"P{P:g}-m{m:g}-s{s}", Pr, m, Na, 4e9, flops, s,
                                loss * np.exp(noise * rng.standard_normal())))
    return pl.DataFrame(rows)


MODULATED = dict(E=1.7, A=150.0, G_P=4e4, G_m=800.0, B=600.0, alpha=0.3, beta=0.3, gamma_P=0.25, gamma_m=0.5)


def modulated_loss(P, m, N, D, p=MODULATED) -> float:
    """F2: L = E + (A + G_P·P^−γ_P + G_m·m^−γ_m)·N_a^−α + B·D^−β."""
    return p["E"] + (p["A"] + p["G_P"] * P ** -p["gamma_P"] + p["G_m"] * m ** -p["gamma_m"]) * N ** -p["alpha"] \
        + p["B"] * D ** -p["beta"]


def planted_modulated(noise=0.003, rng=0, p=MODULATED, tilt=(0.0, 0.0), small=False,
                      rounding=0.0) -> pl.DataFrame:
    """F2 on 3 P × 3 m × 3 N_a × 3 D (``small``: 2 N_a × 2 D), one run each (81 or 36 runs). ``tilt`` = (t_P, t_m)
    multiplies the loss by (P/4e7)^t_P·(m/64)^t_m: positive, it makes a knob hurt, which F2 cannot express."""
    rng = np.random.default_rng(rng)
    Ns, Ds = ([5e7, 2e8], [1e9, 9e9]) if small else ([5e7, 1e8, 2e8], [1e9, 3e9, 9e9])
    return pl.DataFrame([row(f"P{P:g}-m{m}-N{N:g}-D{D:g}", rounded(P, i, rounding), m, N, D, 6 * N, 0,
                             modulated_loss(rounded(P, i, rounding), m, N, D, p) * (P / 4e7) ** tilt[0]
                             * (m / 64) ** tilt[1] * np.exp(noise * rng.standard_normal()))
                         for i, P in enumerate([1e7, 4e7, 1.6e8]) for m in [16, 64, 256] for N in Ns for D in Ds])


def modulated_truth(centre, p=MODULATED) -> tuple[float, float]:
    """(e_P, e_m) of the planted F2 law at the design centre (log P₀, log m₀, log N₀, log D₀): −γ·term/L."""
    P, m, N, D = np.exp(centre)
    L = modulated_loss(P, m, N, D, p)
    return (-p["gamma_P"] * p["G_P"] * P ** -p["gamma_P"] * N ** -p["alpha"] / L,
            -p["gamma_m"] * p["G_m"] * m ** -p["gamma_m"] * N ** -p["alpha"] / L)
