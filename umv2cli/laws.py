"""The scaling laws `umv2 fit` knows, and the Huber-on-log-loss fitting they share (docs/fitting.md).

Every law predicts log L and is fitted by minimising the **summed** Huber loss (δ = 1e-3) between log L̂ and
log L (Hoffmann et al. 2022, Approach 3; summed, not averaged, after Besiroglu et al. 2024). Each fit takes
per-row weights ``w``: the bootstrap passes how many times each row was drawn, so a resample is a weighted fit
and the rows themselves are never copied.

- `fit_loglinear` is linear in its parameters, so the Huber problem is convex: `huber_linear` (Newton steps on
  the piecewise-quadratic objective, guarded by iteratively reweighted least squares) finds the minimum, batched
  over many weight vectors at once.
- `fit_chinchilla` and `fit_modulated` are sums of positive power laws, written as log-sum-exp in log
  coefficients (so coefficients stay positive). Starts come from variable projection: on a grid of exponents,
  non-negative least squares (NNLS) gives the linear coefficients; the best starts are then polished by
  L-BFGS-B on the Huber objective, within bounds.

Library code: no printing, no typer.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, nnls

DELTA = 1e-3  # Huber δ on log L (Hoffmann et al. 2022)


@dataclass(frozen=True)
class LawFit:
    """One fitted law: full-precision parameters, the objective and how the optimiser ended."""

    form: str
    params: dict
    """Named parameters in the law's own formula (full precision)."""
    theta: np.ndarray = field(repr=False)
    """The optimiser's parameter vector (internal parameterisation), reused as a start for refits."""
    objective: float
    """Summed Huber loss (δ = 1e-3) of log L̂ − log L at the optimum."""
    converged: bool
    message: str
    start_objectives: tuple = ()
    """Best objective reached from each start (sorted); their spread shows whether starts disagree."""


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber loss: r²/2 for |r| ≤ δ, δ(|r| − δ/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


# ---------------------------------------------------------------------------------------------- F1 loglinear

def loglinear_design(lP: np.ndarray, lm: np.ndarray, lD: np.ndarray | None, centre: tuple) -> np.ndarray:
    """Columns [1, x, y, x·y (, z)] with x = log P − log P₀, y = log m − log m₀, z = log D − log D₀; ``centre`` is
    (log P₀, log m₀, log N₀, log D₀).

    Centring at the design centre makes the coefficients of x and y the elasticities there (e_P, e_m).
    """
    x, y = lP - centre[0], lm - centre[1]
    cols = [np.ones_like(x), x, y, x * y]
    if lD is not None:
        cols.append(lD - centre[3])
    return np.stack(cols, axis=1)


STEP_LENGTHS = 0.5 ** np.arange(16)
"""The fractions of a Newton step that `huber_linear` tries (a batched backtracking line search)."""


def huber_linear(X: np.ndarray, y: np.ndarray, W: np.ndarray, delta: float = DELTA,
                 max_iter: int = 1000, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise f_b(θ) = Σᵢ Wᵦᵢ·huber(Xᵢθ − yᵢ) for every row b of W at once (convex: one start suffices).

    Each step takes whichever of two candidates has the lower objective:
    - Newton's step on the piecewise-quadratic f, with curvature from the rows inside the quadratic zone
      (|r| ≤ δ) only, at the best of the lengths `STEP_LENGTHS` (a full step may leave the zone it was computed
      in). Once that set of rows stops changing a full step lands on the minimum exactly.
    - The IRLS (majorise-minimise) step, which weights row i by min(1, δ/|rᵢ|). Its majoriser always descends, so
      the pair converges from anywhere; alone it converges only linearly (hundreds of steps when most rows lie
      outside the quadratic zone, as they do with δ = 1e-3 and seed noise of 1e-2).
    Returns (θ of shape (B, k), ok: the weighted design has full rank, converged: the last step was below tol).
    """
    W = np.atleast_2d(W).astype(float)
    k = X.shape[1]
    A0 = np.einsum("bn,nk,nl->bkl", W, X, X)
    ok = np.linalg.cond(A0) < 1e10
    A0[~ok] += np.eye(k)  # keep the batch solvable; these resamples are reported as failed
    theta = np.linalg.solve(A0, np.einsum("bn,nk,n->bk", W, X, y)[..., None])[..., 0]
    converged = np.zeros(len(W), bool)
    for _ in range(max_iter):
        todo = np.flatnonzero(ok & ~converged)
        if not len(todo):
            break
        th, w = theta[todo], W[todo]
        r = th @ X.T - y
        grad = np.einsum("bn,nk->bk", w * np.clip(r, -delta, delta), X)
        mm = np.einsum("bn,nk,nl->bkl", w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300)), X, X)
        hess = np.einsum("bn,nk,nl->bkl", w * (np.abs(r) <= delta), X, X)
        ev = np.linalg.eigvalsh(hess)
        flat = ev[:, 0] <= 1e-9 * ev[:, -1]  # too few rows in the zone to fix every parameter
        hess[flat] = mm[flat]
        newton = np.linalg.solve(hess, grad[..., None])[..., 0]
        cand = th[None] - np.concatenate([np.linalg.solve(mm, grad[..., None])[..., 0][None],
                                          STEP_LENGTHS[:, None, None] * newton[None]])
        f = np.sum(w * huber(np.einsum("cbk,nk->cbn", cand, X) - y, delta), axis=2)
        new = cand[np.argmin(f, axis=0), np.arange(len(todo))]
        converged[todo] = np.max(np.abs(new - th), axis=1) <= tol * (1 + np.max(np.abs(th), axis=1))
        theta[todo] = new
    return theta, ok, converged


def fit_loglinear(lP, lm, lD, y, centre, w=None, check_starts: bool = True) -> LawFit:
    """F1 `loglinear` (Clark et al. 2022, arXiv 2202.01169, with (P, m) in place of (N, Ê)):

        log L = c0 + a·log P + b·log m + c·log P·log m (+ d·log D)

    The d term is present when ``lD`` is given (D varies). Elasticities: e_P = a + c·log m, e_m = b + c·log P.
    Fitted by `huber_linear` (convex); with ``check_starts``, L-BFGS-B from four more starts checks the optimum and
    gives the spread of objectives across starts.
    """
    X = loglinear_design(lP, lm, lD, centre)
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    theta, ok, conv = huber_linear(X, y, w[None])
    theta = theta[0]

    def obj(t):
        r = X @ t - y
        return np.sum(w * huber(r)) / DELTA, X.T @ (w * np.clip(r, -DELTA, DELTA)) / DELTA

    starts = [theta, np.zeros(X.shape[1]), np.r_[np.mean(y), np.zeros(X.shape[1] - 1)], theta + 0.05]
    objs = sorted(float(minimize(obj, s, jac=True, method="L-BFGS-B",
                                 options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12}).fun * DELTA)
                  for s in starts) if check_starts else []
    best = float(np.sum(w * huber(X @ theta - y)))
    return LawFit("loglinear", loglinear_params(theta, centre, lD is not None), theta, best,
                  bool(ok[0] and conv[0]),
                  "Newton/IRLS converged" if conv[0] else "Newton/IRLS hit its iteration limit",
                  tuple(sorted([best, *objs])))


def loglinear_params(theta: np.ndarray, centre: tuple, with_D: bool) -> dict:
    """The centred coefficients θ = (c0', a', b', c (, d)) in the formula's own uncentred form."""
    p0, q0 = centre[0], centre[1]
    c0p, ap, bp, c = theta[:4]
    params = {"c0": c0p - ap * p0 - bp * q0 + c * p0 * q0, "a": ap - c * q0, "b": bp - c * p0, "c": c}
    if with_D:
        params["d"] = theta[4]
        params["c0"] -= theta[4] * centre[3]
    return {k: float(v) for k, v in params.items()}


# ------------------------------------------------------------------------------ F0 / F2: sums of power laws

def _lse_terms(theta: np.ndarray, feats: np.ndarray, spec: list) -> np.ndarray:
    """Log of each positive term, shape (n, n_terms). ``spec[j]`` = (coef index, [(exp index, feature col)])."""
    out = np.empty((feats.shape[0], len(spec)))
    for j, (ci, exps) in enumerate(spec):
        out[:, j] = theta[ci] - sum(theta[ei] * feats[:, fc] for ei, fc in exps)
    return out


def _lse_objective(theta, feats, spec, y, w):
    """Summed Huber of log L̂ − log L (divided by δ for the optimiser's scale) and its gradient."""
    t = _lse_terms(theta, feats, spec)
    tmax = t.max(axis=1, keepdims=True)
    e = np.exp(t - tmax)
    pred = tmax[:, 0] + np.log(e.sum(axis=1))
    s = e / e.sum(axis=1, keepdims=True)  # ∂ log L̂ / ∂ term
    r = pred - y
    g = w * np.clip(r, -DELTA, DELTA) / DELTA
    grad = np.zeros_like(theta)
    for j, (ci, exps) in enumerate(spec):
        gj = g * s[:, j]
        grad[ci] += gj.sum()
        for ei, fc in exps:
            grad[ei] -= (gj * feats[:, fc]).sum()
    return float(np.sum(w * huber(r)) / DELTA), grad


def lse_predict(theta, feats, spec) -> np.ndarray:
    """log L̂ of a sum of power laws."""
    t = _lse_terms(theta, feats, spec)
    tmax = t.max(axis=1)
    return tmax + np.log(np.exp(t - tmax[:, None]).sum(axis=1))


STATIONARY = 1e-4
"""A point counts as converged when its projected gradient (of the summed Huber / δ) is at most this, even where
L-BFGS-B ends "ABNORMAL": started at a minimum, as a bootstrap refit from the full fit can be, its line search
finds no decrease and stops there (gradient ~1e-6), while runs it calls converged end with gradients ~1e-5."""


def _polish(feats, spec, y, w, starts, bounds) -> tuple[np.ndarray, float, bool, str, tuple]:
    """L-BFGS-B from each start; the best result, its convergence and every start's objective."""
    lo, hi = np.array(bounds).T
    results = [minimize(_lse_objective, np.clip(s, lo, hi), args=(feats, spec, y, w), jac=True,
                        method="L-BFGS-B", bounds=bounds,
                        options={"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-6}) for s in starts]
    best = min(results, key=lambda r: r.fun)
    g = best.jac * ~(((best.x <= lo) & (best.jac > 0)) | ((best.x >= hi) & (best.jac < 0)))  # projected gradient
    return best.x, float(best.fun * DELTA), bool(best.success or np.max(np.abs(g)) <= STATIONARY), \
        str(best.message), tuple(sorted(float(r.fun * DELTA) for r in results))


def _vp_starts(feats, spec, n_coef, exp_grid, y, w, n_best, n_theta):
    """Variable projection: for each exponent vector, NNLS for the coefficients of L = Σ coef·Π feat^−exp."""
    L = np.exp(y)
    sw = np.sqrt(w)
    found = []
    for exps in exp_grid:
        theta = np.zeros(n_theta)
        theta[n_coef:] = exps
        cols = np.exp(_lse_terms(theta, feats, spec))  # coefficient 1 in every term
        scale = cols.max(axis=0)
        coef, rnorm = nnls(cols / scale * sw[:, None], L * sw)
        theta[:n_coef] = np.log(np.maximum(coef / scale, 1e-30))
        found.append((rnorm, theta))
    found.sort(key=lambda f: f[0])
    return [t for _, t in found[:n_best]]


def chinchilla_spec(with_D: bool) -> tuple[list, int]:
    """θ = (e, a, b | α, β): log-coefficients then exponents; features [log N, log D]."""
    if with_D:
        return [(0, []), (1, [(3, 0)]), (2, [(4, 1)])], 3
    return [(0, []), (1, [(2, 0)])], 2


def fit_chinchilla(lN, lD, y, w=None, start=None) -> LawFit:
    """F0 `chinchilla` (Hoffmann et al. 2022, arXiv 2203.15556, Approach 3):

        L = E + A/N^α + B/D^β,   N = activated_params, D = tokens

    When D takes one value the B term cannot be told from E and is dropped (L = E + A/N^α). Log-coefficients
    e, a, b with E = eᵉ ≤ min L (OLMo-core's bound), exponents in [0, 3]. ``start`` (a θ) skips the grid.
    """
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    with_D = lD is not None
    spec, n_coef = chinchilla_spec(with_D)
    feats = np.stack([lN, lD if with_D else np.zeros_like(lN)], axis=1)
    bounds = [(-10.0, float(np.min(y[w > 0]))), *[(-20.0, 80.0)] * (n_coef - 1), *[(0.0, 3.0)] * (n_coef - 1)]
    if start is None:
        grid = np.linspace(0.05, 1.5, 15)
        exp_grid = [(a, b) for a in grid for b in grid] if with_D else [(a,) for a in grid]
        starts = _vp_starts(feats, spec, n_coef, exp_grid, y, w, 4, 2 * n_coef - 1)
    else:
        starts = [start]
    theta, obj, ok, msg, objs = _polish(feats, spec, y, w, starts, bounds)
    params = {"E": np.exp(theta[0]), "A": np.exp(theta[1]), "alpha": theta[n_coef]}
    if with_D:
        params |= {"B": np.exp(theta[2]), "beta": theta[4]}
    return LawFit("chinchilla", {k: float(v) for k, v in params.items()}, theta, obj, ok, msg, objs)


def chinchilla_predict(theta, lN, lD) -> np.ndarray:
    """log L̂ of a fitted `chinchilla` θ."""
    with_D = len(theta) == 5
    spec, _ = chinchilla_spec(with_D)
    return lse_predict(theta, np.stack([lN, lD if with_D else np.zeros_like(lN)], axis=1), spec)


MODULATED_SPEC = [(0, []), (1, [(5, 2)]), (2, [(7, 0), (5, 2)]), (3, [(8, 1), (5, 2)]), (4, [(6, 3)])]
"""θ = (e, a, g_P, g_m, b | α, β, γ_P, γ_m); features [log P, log m, log N_a, log D]."""


def fit_modulated(lP, lm, lN, lD, y, w=None, start=None) -> LawFit:
    """F2 `modulated` (after Krajewski et al. 2024, arXiv 2402.07871; the sparse knobs modulate the N_a term):

        L = E + (A + G_P·P^−γ_P + G_m·m^−γ_m)·N_a^−α + B·D^−β

    Needs ≥ 2 values of N_a and of D. Starts by variable projection (NNLS for E, A, G_P, G_m, B on a grid of the
    four exponents), then L-BFGS-B on the Huber objective in log-coefficients.
    """
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    feats = np.stack([lP, lm, lN, lD], axis=1)
    bounds = [(-10.0, float(np.min(y[w > 0]))), *[(-30.0, 120.0)] * 4, *[(0.0, 3.0)] * 4]
    if start is None:
        g = np.linspace(0.1, 1.2, 6)
        exp_grid = [(a, b, gp, gm) for a in g for b in g for gp in g for gm in g]
        starts = _vp_starts(feats, MODULATED_SPEC, 5, exp_grid, y, w, 8, 9)
    else:
        starts = [start]
    theta, obj, ok, msg, objs = _polish(feats, MODULATED_SPEC, y, w, starts, bounds)
    names = ["E", "A", "G_P", "G_m", "B"]
    params = {n: float(np.exp(theta[i])) for i, n in enumerate(names)}
    params |= {n: float(theta[5 + i]) for i, n in enumerate(["alpha", "beta", "gamma_P", "gamma_m"])}
    return LawFit("modulated", params, theta, obj, ok, msg, objs)


def modulated_predict(theta, lP, lm, lN, lD) -> np.ndarray:
    """log L̂ of a fitted `modulated` θ."""
    return lse_predict(theta, np.stack([lP, lm, lN, lD], axis=1), MODULATED_SPEC)


def modulated_elasticities(theta, lP, lm, lN, lD) -> tuple[float, float]:
    """(e_P, e_m) = ∂log L̂/∂log P and ∂log L̂/∂log m at one point: −γ·(its term)/L̂."""
    x = [np.atleast_1d(v) for v in (lP, lm, lN, lD)]
    t = _lse_terms(theta, np.stack(x, axis=1), MODULATED_SPEC)[0]
    share = np.exp(t - np.log(np.exp(t).sum()))
    return float(-theta[7] * share[2]), float(-theta[8] * share[3])
