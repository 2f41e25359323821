"""Exact partial information decomposition of a discrete joint distribution p(x1, x2, y) (BROJA definition).

Bertschinger, Rauh, Olbrich, Jost, Ay (2014) define the decomposition through the optimisation

    q* = argmin_{q in Δp} I_q(X1, X2; Y),   Δp = {q : q(x1, y) = p(x1, y), q(x2, y) = p(x2, y)},

after which (Liang et al., NeurIPS 2023, use the same definition, "CVX"):

    U1 = I_q*(X1; Y | X2),  U2 = I_q*(X2; Y | X1),  R = I(X1; Y) - U1,  S = I_p(X1, X2; Y) - I_q*(X1, X2; Y).

Minimising I_q(X1, X2; Y) is maximising H_q(Y | X1, X2) (H(Y) is fixed on Δp), a convex problem with linear
constraints. It is solved here by a log-barrier Newton method (`method="barrier"`, the default: exact Newton
steps on the marginal polytope, each a Cholesky solve of size (n1 + n2 - 1) * ny), or by scipy's `trust-constr`
(`method="trust-constr"`, slower and less precise near the boundary; kept as an independent cross-check).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg, optimize, sparse
from threadpoolctl import threadpool_limits

from ._checks import as_finite_array, check_distribution, check_same_length

LN2 = math.log(2.0)
# Components are non-negative in theory: values below zero by at most this much (bits) are rounding noise, clipped
# to 0 (and reported in `solver_message`); anything more negative marks the result as not converged.
CLIP_TOLERANCE = 1e-6
# Largest violation of the marginal constraints (before the final exact rescaling) that still counts as converged.
FEASIBILITY_TOLERANCE = 1e-6
# Table entries below this are set to 0: they change no information term by more than ~1e-10 bits, and leaving
# them in makes the marginal constraints differ by many orders of magnitude (an ill-conditioned Newton system).
NEGLIGIBLE_MASS = 1e-12
_BARRIER_GROWTH = 30.0  # t multiplier between centring phases
_CENTRING_TOLERANCE = 1e-10  # on half the squared Newton decrement of the barrier problem


class PIDConvergenceWarning(RuntimeWarning):
    """The PID solver stopped before reaching its tolerance; the components may be off by more than `tol`."""


@dataclass(frozen=True)
class PIDResult:
    """
    Partial information decomposition of I(X1, X2; Y), in bits.

    Args:
        redundancy (`float`): R, information about Y that either modality alone gives.
        unique (`tuple[float, float]`): (U1, U2), information only X1 (resp. X2) gives.
        synergy (`float`): S, information that appears only when X1 and X2 are seen together.
        total (`float`): I(X1, X2; Y) = R + U1 + U2 + S.
        converged (`bool`): whether the solver reached its tolerance.
        iterations (`int`): solver iterations (Newton steps for `barrier`, SQP iterations for `trust-constr`).
        solver_message (`str`): how the solver stopped, and any clipping of tiny negative components to 0.
    """

    redundancy: float
    unique: tuple[float, float]
    synergy: float
    total: float
    converged: bool
    iterations: int
    solver_message: str

    def to_dict(self) -> dict:
        return {
            "units": "bits",
            "redundancy": self.redundancy,
            "unique": list(self.unique),
            "synergy": self.synergy,
            "total": self.total,
            "converged": self.converged,
            "iterations": self.iterations,
            "solver_message": self.solver_message,
        }


def mutual_information(joint: np.ndarray) -> float:
    """I(A; B) in bits of a 2-D joint table p(a, b) (entries summing to one)."""
    return _entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0)) - _entropy(joint)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


class _MarginalPolytope:
    """
    Δp in coordinates: one variable per cell (x1, x2, y) with p(x1, y) > 0 and p(x2, y) > 0 (every other cell of
    any q in Δp is zero), and the constraints A q = b, one row per (x1, y) and per (x2, y) with positive mass. For
    each y the two groups of rows both sum to p(y), so one (x2, y) row per y is dropped; the rest has full rank.
    `rows[:, v]` are the two constraint rows of variable v, the dropped one written as the dummy row `m`.
    """

    def __init__(self, p: np.ndarray):
        n1, n2, ny = p.shape
        self.shape = p.shape
        self.p1, self.p2 = p.sum(axis=1), p.sum(axis=0)  # p(x1, y), p(x2, y)
        x1, x2, y = np.nonzero((self.p1[:, None, :] > 0) & (self.p2[None, :, :] > 0))
        self.cells = (x1, x2, y)
        rows1 = np.full((n1, ny), -1)
        has1 = self.p1 > 0
        rows1[has1] = np.arange(has1.sum())
        has2 = self.p2 > 0
        occupied = has2.any(axis=0)
        last_x2 = n2 - 1 - np.argmax(has2[::-1], axis=0)
        has2[last_x2[occupied], np.nonzero(occupied)[0]] = False
        self.m = int(has1.sum() + has2.sum())
        rows2 = np.full((n2, ny), self.m)
        rows2[has2] = has1.sum() + np.arange(has2.sum())
        self.rows = np.stack([rows1[x1, y], rows2[x2, y]])
        self.b = np.concatenate([self.p1[has1], self.p2[has2]])
        _, self.pair = np.unique(x1 * n2 + x2, return_inverse=True)
        self.n_pairs = int(self.pair.max()) + 1
        # q(x1, x2, y) = p(x1, y) p(x2, y) / p(y) (X1, X2 independent given Y) lies in Δp and is positive on every
        # variable: a strictly feasible start.
        self.start = self.p1[x1, y] * self.p2[x2, y] / self.p1.sum(axis=0)[y]

    @property
    def size(self) -> int:
        return self.start.size

    def apply(self, x: np.ndarray) -> np.ndarray:
        """A x."""
        return np.bincount(self.rows.ravel(), weights=np.tile(x, 2), minlength=self.m + 1)[: self.m]

    def apply_transpose(self, w: np.ndarray) -> np.ndarray:
        """A^T w."""
        padded = np.append(w, 0.0)
        return padded[self.rows[0]] + padded[self.rows[1]]

    def pair_mass(self, x: np.ndarray) -> np.ndarray:
        """q(x1, x2) for the (x1, x2) pairs that have variables."""
        return np.bincount(self.pair, weights=x, minlength=self.n_pairs)

    def objective(self, x: np.ndarray) -> float:
        """-H_q(Y | X1, X2) in nats (convex; H(Y) is constant on Δp, so this is I_q(X1, X2; Y) - H(Y))."""
        mass = self.pair_mass(x)
        return float(np.sum(x * np.log(x)) - np.sum(mass * np.log(mass)))

    def to_table(self, x: np.ndarray) -> np.ndarray:
        q = np.zeros(self.shape)
        q[self.cells] = x
        return q

    def constraint_matrix(self) -> sparse.csr_matrix:
        keep = self.rows.ravel() < self.m
        cols = np.tile(np.arange(self.size), 2)[keep]
        return sparse.csr_matrix((np.ones(keep.sum()), (self.rows.ravel()[keep], cols)), shape=(self.m, self.size))


def _schur_indices(polytope: _MarginalPolytope) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Flat indices into the (m+1)^2 Schur matrix A H^-1 A^T (row m is the dummy row), for its two parts: A diag(dinv)
    A^T (each variable with itself) and the rank-one term of each (x1, x2) block of H^-1 (every ordered pair of
    variables in the same block, listed as `first`, `second`).
    """
    side = polytope.m + 1
    rows = polytope.rows
    own = np.concatenate([rows[a] * side + rows[b] for a in (0, 1) for b in (0, 1)])
    order = np.argsort(polytope.pair, kind="stable")
    counts = np.bincount(polytope.pair)
    group = np.repeat(np.arange(len(counts)), counts * counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts * counts)
    within = np.arange(group.size) - np.repeat(np.cumsum(counts * counts) - counts * counts, counts * counts)
    first = order[starts + within // counts[group]]
    second = order[starts + within % counts[group]]
    coupled = np.concatenate([rows[a][first] * side + rows[b][second] for a in (0, 1) for b in (0, 1)])
    return own, coupled, first, second


def _solve_barrier(polytope: _MarginalPolytope, tol: float, max_iterations: int):
    """
    Log-barrier Newton method (Boyd & Vandenberghe, ch. 11): minimise t * f(x) - sum(log x) subject to A x = b for
    t = 1, 30, 900, ... until the duality-gap bound n / t is below `tol` (bits). Each Newton step solves the KKT
    system through its Schur complement A H^-1 A^T (size m); H is block diagonal over (x1, x2) pairs with blocks
    diag(d) - c 11^T, inverted in closed form (Sherman-Morrison).
    """
    x = polytope.start.copy()
    n, m, pair, n_pairs = polytope.size, polytope.m, polytope.pair, polytope.n_pairs
    side = m + 1
    own, coupled, first, second = _schur_indices(polytope)

    def barrier(x, t):
        return t * polytope.objective(x) - float(np.sum(np.log(x)))

    t, iterations, status = 1.0 / _BARRIER_GROWTH, 0, "centred"
    while status == "centred" and n / t / LN2 > tol:
        t *= _BARRIER_GROWTH
        status = "max_iterations"
        while iterations < max_iterations:
            iterations += 1
            mass = polytope.pair_mass(x)
            grad = t * (np.log(x) - np.log(mass[pair])) - 1.0 / x
            # H = diag(t/x + 1/x^2) - G^T diag(t/mass) G;  H^-1 = diag(dinv) + dinv G^T diag(gamma) G dinv.
            dinv = x * x / (t * x + 1.0)
            gamma = t / np.bincount(pair, weights=x / (t * x + 1.0), minlength=n_pairs)

            def solve_h(v):
                dv = dinv * v
                return dv + dinv * (gamma * np.bincount(pair, weights=dv, minlength=n_pairs))[pair]

            schur = np.bincount(own, weights=np.tile(dinv, 4), minlength=side * side)
            schur += np.bincount(coupled, weights=np.tile(gamma[pair[first]] * dinv[first] * dinv[second], 4),
                                 minlength=side * side)
            schur = schur.reshape(side, side)[:m, :m]
            rhs = -polytope.apply(solve_h(grad))
            scale = 1.0 / np.sqrt(np.diag(schur))  # equilibrate: marginals can differ by orders of magnitude
            try:
                w = scale * linalg.cho_solve(linalg.cho_factor(schur * np.outer(scale, scale)), rhs * scale)
            except linalg.LinAlgError:
                w = linalg.lstsq(schur, rhs)[0]
            step = -solve_h(grad + polytope.apply_transpose(w))
            slope = float(grad @ step)  # = -(Newton decrement)^2
            if -slope / 2 <= _CENTRING_TOLERANCE:
                status = "centred"
                break
            shrinking = step < 0
            size = min(1.0, 0.99 * float(np.min(-x[shrinking] / step[shrinking]))) if shrinking.any() else 1.0
            current = barrier(x, t)
            while barrier(x + size * step, t) > current + 0.25 * size * slope:  # Armijo backtracking
                size *= 0.5
                if size < 1e-12:
                    break
            if size < 1e-12:
                status = "line search failed"
                break
            x = x + size * step
    gap_bits = n / t / LN2
    residual = float(np.abs(polytope.b - polytope.apply(x)).max())
    converged = status == "centred" and residual <= FEASIBILITY_TOLERANCE
    message = f"barrier: duality gap bound {gap_bits:.1e} bits after {iterations} Newton steps"
    if status != "centred":
        message += f"; stopped ({status}, max_iterations={max_iterations}) before reaching tol={tol:g}"
    message += f"; marginal violation {residual:.1e} before exact rescaling"
    if residual > FEASIBILITY_TOLERANCE:
        message += f" (> {FEASIBILITY_TOLERANCE:g}: tol is too small for double precision)"
    return x, converged, iterations, message


def _solve_trust_constr(polytope: _MarginalPolytope, tol: float, max_iterations: int):
    """The same problem through `scipy.optimize.minimize(method="trust-constr")` with exact gradient and Hessian."""
    tiny = 1e-300
    pair, n_pairs = polytope.pair, polytope.n_pairs

    def objective(x):
        return polytope.objective(np.maximum(x, tiny))

    def gradient(x):
        x = np.maximum(x, tiny)
        return np.log(x) - np.log(polytope.pair_mass(x))[pair]

    def hessian(x):
        x = np.maximum(x, tiny)
        pairs = sparse.csr_matrix((np.ones(x.size), (pair, np.arange(x.size))), shape=(n_pairs, x.size))
        return sparse.diags(1.0 / x) - pairs.T @ sparse.diags(1.0 / polytope.pair_mass(x)) @ pairs

    constraint = optimize.LinearConstraint(polytope.constraint_matrix(), polytope.b, polytope.b)
    result = optimize.minimize(
        objective, polytope.start, jac=gradient, hess=hessian, method="trust-constr", constraints=[constraint],
        bounds=optimize.Bounds(0.0, 1.0, keep_feasible=True),
        options={"gtol": tol * LN2, "xtol": 1e-14, "barrier_tol": tol * LN2, "maxiter": max_iterations},
    )
    x = np.maximum(result.x, 0.0)
    residual = float(np.abs(polytope.b - polytope.apply(x)).max())
    converged = result.status in (1, 2) and residual <= FEASIBILITY_TOLERANCE
    message = f"trust-constr: {result.message}; marginal violation {residual:.1e} before exact rescaling"
    return x, converged, int(result.nit), message


def _match_marginals(q: np.ndarray, p1: np.ndarray, p2: np.ndarray, sweeps: int = 100) -> np.ndarray:
    """Iterative proportional fitting: rescale q (already nearly in Δp) until its (x1, y) and (x2, y) marginals equal
    p's to rounding, so that the information identities hold exactly."""
    for _ in range(sweeps):
        q1 = q.sum(axis=1)
        q = q * np.divide(p1, q1, out=np.zeros_like(p1), where=q1 > 0)[:, None, :]
        q2 = q.sum(axis=0)
        q = q * np.divide(p2, q2, out=np.zeros_like(p2), where=q2 > 0)[None, :, :]
        if np.abs(q.sum(axis=1) - p1).max() <= 1e-15:
            break
    return q


_SOLVERS = {"barrier": _solve_barrier, "trust-constr": _solve_trust_constr}


def pid_from_table(table, *, tol: float = 1e-6, max_iterations: int = 500, method: str = "barrier") -> PIDResult:
    """
    BROJA partial information decomposition of a discrete joint distribution, in bits.

    Components are computed from one optimal q, so the identities R + U1 = I(X1;Y), R + U2 = I(X2;Y) and
    R + U1 + U2 + S = I(X1,X2;Y) hold to rounding. Components are non-negative in theory; values in
    [-1e-6, 0) are rounding noise and are clipped to 0 (`solver_message` says so). Entries below 1e-12 are treated
    as 0 (they move no information term by more than ~1e-10 bits).

    Args:
        table (`array_like` of shape `(n1, n2, ny)`): p(x1, x2, y); non-negative, summing to 1 within 1e-6.
        tol (`float`): target accuracy of the components in bits (bound on the solver's duality gap).
        max_iterations (`int`): cap on solver iterations; when reached, the result has `converged=False` and a
            [`PIDConvergenceWarning`] is issued.
        method (`str`): `"barrier"` (default, fast) or `"trust-constr"` (scipy; cross-check).

    Example:
    ```python
    >>> import numpy as np
    >>> table = np.zeros((2, 2, 2))
    >>> for a in (0, 1):
    ...     for b in (0, 1):
    ...         table[a, b, a ^ b] = 0.25
    >>> round(pid_from_table(table).synergy, 6)
    1.0
    ```
    """
    p = check_distribution(table, "table", ndim=3)
    if method not in _SOLVERS:
        raise ValueError(f"`method` must be one of {sorted(_SOLVERS)}; got {method!r}.")
    if not tol > 0:
        raise ValueError(f"`tol` must be a positive number of bits; got {tol!r}.")
    p = np.where(p < NEGLIGIBLE_MASS, 0.0, p)
    p = p / p.sum()
    polytope = _MarginalPolytope(p)
    # The dense solves are small (at most a few hundred rows): extra BLAS threads only add overhead, and stall badly
    # on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        x, converged, iterations, message = _SOLVERS[method](polytope, tol, max_iterations)
    q = _match_marginals(polytope.to_table(x), polytope.p1, polytope.p2)

    n1, n2, ny = p.shape
    info_1, info_2 = mutual_information(polytope.p1), mutual_information(polytope.p2)
    total = mutual_information(p.reshape(n1 * n2, ny))
    info_q = mutual_information(q.reshape(n1 * n2, ny))
    # On Δp, I_q(X1,X2;Y) = I(X2;Y) + I_q(X1;Y|X2) = I(X1;Y) + I_q(X2;Y|X1): the chain rule gives U1 and U2.
    components = {
        "redundancy": info_1 + info_2 - info_q,
        "unique_1": info_q - info_2,
        "unique_2": info_q - info_1,
        "synergy": total - info_q,
    }
    clipped = {k: v for k, v in components.items() if v < 0}
    if clipped:
        message += "; clipped to 0: " + ", ".join(f"{k}={v:.1e}" for k, v in clipped.items())
        if min(clipped.values()) < -CLIP_TOLERANCE:
            converged = False
        components.update(dict.fromkeys(clipped, 0.0))
    if not converged:
        warnings.warn(f"PID solver did not converge: {message}", PIDConvergenceWarning, stacklevel=2)
    return PIDResult(
        redundancy=components["redundancy"],
        unique=(components["unique_1"], components["unique_2"]),
        synergy=components["synergy"],
        total=total,
        converged=converged,
        iterations=iterations,
        solver_message=message,
    )


def joint_table(x1, x2, y) -> np.ndarray:
    """Empirical p(x1, x2, y) from three aligned 1-D arrays of discrete values (any hashable dtype; 2-D arrays are
    read row-wise, each distinct row one value). Axes follow the sorted distinct values of each input."""
    arrays = {"x1": as_finite_array(x1, "x1", ndim=(1, 2)), "x2": as_finite_array(x2, "x2", ndim=(1, 2)),
              "y": as_finite_array(y, "y", ndim=(1,))}
    n = check_same_length(arrays)
    ids = [np.unique(a, axis=0 if a.ndim == 2 else None, return_inverse=True)[1].ravel() for a in arrays.values()]
    shape = tuple(int(i.max()) + 1 for i in ids)
    counts = np.bincount(np.ravel_multi_index(ids, shape), minlength=math.prod(shape))
    return counts.reshape(shape) / n


def pid_from_samples(x1, x2, y, **solver_kwargs) -> PIDResult:
    """
    BROJA decomposition of the empirical distribution of discrete samples (plug-in estimate, in bits).

    Args:
        x1, x2 (`array_like` of shape `(N,)` or `(N, k)`): discrete values of each modality (ints, strings, ...).
        y (`array_like` of shape `(N,)`): labels.
        **solver_kwargs: `tol`, `max_iterations`, `method` of [`pid_from_table`].
    """
    return pid_from_table(joint_table(x1, x2, y), **solver_kwargs)


__all__ = ["PIDConvergenceWarning", "PIDResult", "joint_table", "mutual_information", "pid_from_samples",
           "pid_from_table"]
