"""Exact multiple-choice knapsack: one option per unit, least total damage within a budget.

Unit u (a layer, or a group of tied layers) has C options with stored cost ``cost[u, c]``
(bits) and predicted damage ``damage[u, c]``; ``inf`` in either marks an option unavailable.
With binary x[u, c]:

    minimise  sum_uc damage[u, c] x[u, c]
    s.t.      sum_c x[u, c] = 1  for every u,    sum_uc cost[u, c] x[u, c] <= budget (+ REL_TOL |budget|,
              so sums taken in another order do not flip feasibility).

How (every reduction is exact; only the last step searches):

1. Budget at least the cost of each unit's least-damage option (ties: the cheaper) -> done.
2. Pareto pruning: an option matched or beaten on both cost and damage by another never helps.
   What is left per unit is a staircase: cost up, damage strictly down.
3. Damages become excess over each unit's least damage (a constant per unit, so the argmin is
   unchanged), costs extra over its cheapest option. Greedy along the lower convex hulls (the
   LP relaxation's path, Sinha & Zoltners 1979) gives a feasible value G and the LP multiplier
   lambda. Lagrangian reduced-cost fixing then drops every option whose bound with it forced
   exceeds G; units left with one option are settled. What remains is a small core.
4. The core is searched exactly ("auto"): a Pareto list of partial (cost, damage) states,
   unit by unit, pruned by the same bound (Nemhauser-Ullmann lists with bounding, as in
   Pisinger's MCKP algorithms), first with limits between L and G (iterative deepening; an
   answer under the limit is proven optimal), finally with G. Sums are compared directly, so
   damages spanning 1e-12 ... 1e3 need no tolerance. Past FRONTIER_MAX_STATES, or with
   method="milp", HiGHS (scipy.optimize.milp, gaps 0, tight feasibility tolerances, objective
   divided by the core's G) solves the core instead; it is blind to differences below ~1e-9
   of the core's damage. Either answer is re-priced on the original arrays and checked
   against the budget and the greedy answer.

Trade-off: the list search is exact for any float costs and fast on sensitivity tables (560 x 13
in ~20 ms) but can blow up on degenerate data (subset-sum), hence the HiGHS fallback (slower here,
~0.1-0.5 s) and `time_limit`. method="dp": an exact dynamic programme over integer costs (time and
memory ~ U x budget / gcd), for cross-checks.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from mixbits.errors import UserError

REL_TOL = 1e-9  # a total within budget * (1 + REL_TOL) fits
METHODS = ("auto", "milp", "dp")
DP_MAX_CELLS = 50_000_000  # units x budget states the dp may tabulate
FRONTIER_MAX_STATES = 5_000_000  # states kept over all steps, or candidates in one, before HiGHS takes over


class BudgetError(UserError):
    """The budget is below the cheapest reachable total cost; the raw totals are attributes."""

    def __init__(self, budget: float, cheapest: float, richest: float) -> None:
        self.budget, self.cheapest, self.richest = float(budget), float(cheapest), float(richest)
        super().__init__(
            f"budget {budget:.10g} is below the cheapest reachable total cost {cheapest:.10g}; "
            f"reachable totals span [{cheapest:.10g}, {richest:.10g}]"
        )


@dataclass(frozen=True, eq=False)  # eq=False: comparing array fields with == is ambiguous
class Solution:
    """The chosen option per unit ([U] int64, read-only), its total cost and damage on the
    original arrays, whether it is proven optimal, and which step produced it: "unconstrained",
    "greedy", "frontier", "milp" or "dp"."""

    choice: np.ndarray
    cost: float
    damage: float
    optimal: bool
    method: str


def feasible_range(cost: np.ndarray) -> tuple[float, float]:
    """(cheapest, richest) total cost over available (finite) options; [U, C] -> two floats."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.size == 0:
        raise ValueError(f"cost must be a non-empty [units, options] array, got shape {cost.shape}")
    finite = np.isfinite(cost)
    empty = np.flatnonzero(~finite.any(axis=1))
    if empty.size:
        raise ValueError(f"unit {empty[0]} has no available option (every cost is inf or NaN)")
    cheapest = np.where(finite, cost, np.inf).min(axis=1).sum()
    richest = np.where(finite, cost, -np.inf).max(axis=1).sum()
    return float(cheapest), float(richest)


def solve_mckp(
    cost: np.ndarray, damage: np.ndarray, budget: float, *, method: str = "auto", time_limit: float = 60.0
) -> Solution:
    """Least total damage, one option per unit, total cost <= budget (see the module docstring).

    `cost`, `damage`: [U, C] floats >= 0, inf = unavailable; `budget` in the unit of `cost`.
    `method`: "auto" (list search, HiGHS as fallback), "milp" (HiGHS on the core) or "dp"
    (integer costs only). `time_limit` (s) bounds the search; hitting it gives optimal=False.
    Raises BudgetError when even the cheapest choice exceeds the budget.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}")
    cost, damage, budget = _validated(cost, damage, budget)
    tol = REL_TOL * abs(budget)
    cheapest, richest = feasible_range(cost)
    if cheapest > budget + tol:
        raise BudgetError(budget, cheapest, richest)
    best = np.lexsort((cost, damage), axis=1)[:, 0]  # least damage, then least cost
    if _total(cost, best) <= budget + tol:
        return _solution(best, cost, damage, True, "unconstrained")
    stairs = _staircases(cost, damage)
    if method == "dp":
        return _solve_dp(cost, damage, budget + tol - cheapest, stairs)
    return _solve_exact(cost, damage, budget, stairs, method, time_limit)


def _validated(cost, damage, budget) -> tuple[np.ndarray, np.ndarray, float]:
    """Float copies with every unavailable option inf in both arrays; errors name the bad entry."""
    cost, damage = np.array(cost, dtype=np.float64), np.array(damage, dtype=np.float64)
    if cost.ndim != 2 or cost.size == 0 or cost.shape != damage.shape:
        raise ValueError(
            f"cost and damage must be non-empty [units, options] arrays of one shape, "
            f"got {cost.shape} and {damage.shape}"
        )
    budget = float(budget)
    if math.isnan(budget) or budget == -math.inf:
        raise ValueError(f"budget must be a number or +inf, got {budget!r}")
    for name, a in (("cost", cost), ("damage", damage)):
        bad = np.argwhere(np.isnan(a) | (a < 0))
        if bad.size:
            u, c = bad[0]
            raise ValueError(
                f"{name}[{u}, {c}] = {float(a[u, c])!r} (unit {u}); use a float >= 0, or inf for an unavailable option"
            )
    off = ~(np.isfinite(cost) & np.isfinite(damage))
    empty = np.flatnonzero(off.all(axis=1))
    if empty.size:
        raise ValueError(f"unit {empty[0]} has no available option: every cost or damage is inf")
    cost[off] = damage[off] = np.inf
    return cost, damage, budget


def _staircases(cost: np.ndarray, damage: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unit's undominated options, cost ascending and damage strictly descending, as [U, C]
    arrays padded on the right: option index (-1), extra cost over the unit's cheapest (inf)
    and excess damage over its least (inf). Of exact duplicates the first option is kept."""
    order = np.lexsort((damage, cost), axis=1)
    c, d = np.take_along_axis(cost, order, axis=1), np.take_along_axis(damage, order, axis=1)
    prior = np.minimum.accumulate(np.concatenate((np.full((len(d), 1), np.inf), d[:, :-1]), axis=1), axis=1)
    keep = (d < prior) & np.isfinite(d)
    left = np.argsort(~keep, axis=1, kind="stable")  # kept options first, in cost order
    keep = np.take_along_axis(keep, left, axis=1)
    index = np.where(keep, np.take_along_axis(order, left, axis=1), -1)
    c = np.where(keep, np.take_along_axis(c, left, axis=1), np.inf)
    d = np.where(keep, np.take_along_axis(d, left, axis=1), np.inf)
    return index, c - c[:, :1], d - d.min(axis=1, keepdims=True)


def _hull(w: np.ndarray, e: np.ndarray) -> np.ndarray:
    """[U, C] mask of the staircase points on each unit's lower convex hull.

    A point on or above the chord between its two kept neighbours is no hull vertex, so all
    such points can go at once; repeat until none is left (at most C passes).
    """
    on = np.isfinite(w)
    while True:
        pos = np.argsort(~on, axis=1, kind="stable")  # kept points first, in cost order
        c, d = np.take_along_axis(w, pos, axis=1), np.take_along_axis(e, pos, axis=1)
        mid = np.arange(1, w.shape[1] - 1) < on.sum(axis=1, keepdims=True) - 1  # kept neighbours both sides
        with np.errstate(invalid="ignore"):  # padding is inf
            saved_in, saved_out = d[:, :-2] - d[:, 1:-1], d[:, 1:-1] - d[:, 2:]
            drop = mid & (saved_in * (c[:, 2:] - c[:, 1:-1]) <= saved_out * (c[:, 1:-1] - c[:, :-2]))
        if not drop.any():
            return on
        rows, cols = np.nonzero(drop)
        on[rows, pos[rows, cols + 1]] = False


def _lp_path(w: np.ndarray, e: np.ndarray, hull: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every hull step of every unit as arrays (unit, target position, extra cost, efficiency =
    damage saved per extra cost), in the LP relaxation's order: best efficiency first."""
    pos = np.argsort(~hull, axis=1, kind="stable")
    c, d = np.take_along_axis(w, pos, axis=1), np.take_along_axis(e, pos, axis=1)
    step = np.arange(1, w.shape[1]) < hull.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(step, (d[:, :-1] - d[:, 1:]) / (c[:, 1:] - c[:, :-1]), -np.inf)
    eff = np.minimum.accumulate(eff, axis=1)  # rounding must not reorder a unit's own steps
    unit, rank = np.nonzero(step)
    order = np.lexsort((rank, unit, -eff[unit, rank]))
    unit, rank = unit[order], rank[order]
    return unit, pos[unit, rank + 1], c[unit, rank + 1] - c[unit, rank], eff[unit, rank]


def _greedy(path: tuple[np.ndarray, ...], units: int, slack: float) -> tuple[np.ndarray, float]:
    """A feasible pick (position on each staircase) and the LP's multiplier lambda.

    Take hull steps in LP order while they fit (the LP optimum stops at the first that does
    not; its efficiency is lambda), then keep going past units whose next step does not fit.
    """
    unit, target, extra, eff = path
    fits = np.cumsum(extra) <= slack
    split = len(fits) if fits.all() else int(np.argmin(fits))
    lam = float(eff[split]) if split < len(eff) else 0.0
    pick = np.zeros(units, dtype=np.int64)
    np.maximum.at(pick, unit[:split], target[:split])  # a unit's steps come in order
    room = slack - float(extra[:split].sum())
    blocked = np.zeros(units, dtype=bool)
    for u, t, x in zip(unit[split:], target[split:], extra[split:]):
        if blocked[u]:
            continue
        if x <= room:
            pick[u], room = t, room - x
        else:
            blocked[u] = True  # its later steps need this one first
    return pick, lam


def _reduced(w: np.ndarray, e: np.ndarray, pick: np.ndarray, lam: float, slack: float, gap: float) -> np.ndarray:
    """[U, C] mask of the staircase options that can still be in an optimal answer (an exact test).

    For any lambda >= 0 and any x within the slack, sum e x >= sum_u min_c (e + lambda w)
    - lambda slack =: L, and forcing option (u, c) adds its reduced cost r = e + lambda w
    - min. An option with L + r above the greedy value G is in no optimal answer, nor is one
    whose excess damage alone exceeds G or whose extra cost exceeds the slack.
    """
    pen = e + lam * w
    low = pen.min(axis=1, keepdims=True)
    bound = float(low.sum()) - lam * slack
    margin = 1e-9 * (gap + lam * slack)  # far above rounding in `bound`; it only weakens the test
    keep = ((pen - low) + bound <= gap + margin) & (e <= gap) & (w <= slack)
    keep[np.arange(len(pick)), pick] = True  # the greedy answer stays available whatever rounding did
    return keep


def _solve_exact(cost, damage, budget, stairs, method, time_limit) -> Solution:
    """Steps 3 and 4 of the module docstring on the padded staircases `stairs`."""
    deadline, tol = time.monotonic() + time_limit, REL_TOL * abs(budget)
    index, w, e = stairs
    rows = np.arange(len(index))
    slack = budget - float(cost[rows, index[:, 0]].sum())
    pick, lam = _greedy(_lp_path(w, e, _hull(w, e)), len(index), slack)
    start = index[rows, pick]
    if not e[rows, pick].any():  # every unit at its least damage
        return _solution(start, cost, damage, True, "greedy")
    keep = _reduced(w, e, pick, lam, slack + tol, float(e[rows, pick].sum()))
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    # The core: free units only, each cost shifted so its cheapest remaining option costs 0.
    shift = np.where(keep, w, np.inf)[free].min(axis=1)
    ccost = [w[u, keep[u]] - s for u, s in zip(free, shift)]
    cdmg = [e[u, keep[u]] for u in free]
    settled = ~np.isin(rows, free)
    room = slack + tol - float(w[rows, pick][settled].sum()) - float(shift.sum())
    gap = float(e[free, pick[free]].sum())
    choice, proven, used = start.copy(), True, "greedy"
    if gap > 0.0:  # at gap == 0 the greedy already reaches the core's least damage
        found = _search(ccost, cdmg, lam, room, gap, deadline) if method == "auto" else None
        used, left = "frontier", deadline - time.monotonic()
        if found is None:
            used, result = "milp", _highs(ccost, cdmg, room - tol / 2, gap, left) if left > 0 else None
            if result is None:
                return _solution(start, cost, damage, False, "greedy")
            found, proven = result
        choice[free] = [index[u, keep[u]][p] for u, p in zip(free, found)]
    harm, harm_start = _total(damage, choice), _total(damage, start)
    if _total(cost, choice) > budget + tol or harm > harm_start + 1e-12 * harm_start:
        return _solution(start, cost, damage, False, "greedy")  # the search's answer failed the check
    if harm > harm_start:  # a tie up to rounding in the sums: keep the smaller sum
        choice = start
    return _solution(choice, cost, damage, proven, used)


def _search(ccost, cdmg, lam: float, room: float, gap: float, deadline: float) -> np.ndarray | None:
    """Exact least damage on the core, or None past FRONTIER_MAX_STATES or the deadline.

    Iterative deepening on the bound: list searches with a limit T between the Lagrangian
    bound L and the greedy value G keep far fewer states than one with T = G. Any answer of
    value <= T is optimal (every better answer has bound <= its value < T, so it was never
    pruned); otherwise its value, if lower, becomes the new G. The last pass uses T = G.
    """
    bound = float(sum((d + lam * c).min() for c, d in zip(ccost, cdmg))) - lam * room
    for share in (1 / 64, 1 / 8, 1.0):
        limit = bound + share * (gap - bound) if share < 1 else gap
        pos = _frontier(ccost, cdmg, lam, room, limit, deadline)
        if pos is None or (share == 1 and len(pos)):
            return pos  # the last pass keeps every state that could beat G: its best is optimal
        if len(pos):
            value = float(sum(d[p] for d, p in zip(cdmg, pos)))
            if value <= limit:
                return pos
            gap = min(gap, value)
    return None


def _frontier(ccost, cdmg, lam: float, room: float, limit: float, deadline: float) -> np.ndarray | None:
    """List search over the core: positions per unit of the least-damage state kept; an empty
    array when no state stays within `limit`; None past FRONTIER_MAX_STATES or the deadline.

    States are (cost, damage) of partial choices over the units so far. A state is dropped
    when it exceeds the room, when the Lagrangian bound of its best completion (its damage
    + lambda * (its cost - room) + the later units' min of e + lambda w) exceeds `limit`,
    or when another state is no more costly and no more damaging.
    """
    low = np.array([(d + lam * c).min() for c, d in zip(ccost, cdmg)])
    later = np.concatenate((np.cumsum(low[::-1])[::-1][1:], [0.0]))
    margin = 1e-9 * (abs(limit) + lam * room)  # far above rounding in the bound; only weakens the test
    sc, sd = np.zeros(1), np.zeros(1)
    trail, kept = [], 0  # per unit: (parent state, option position) of every state kept
    for u, (c, d) in enumerate(zip(ccost, cdmg)):
        if len(sc) * len(c) > FRONTIER_MAX_STATES:
            return None
        nc, nd = (sc[:, None] + c).ravel(), (sd[:, None] + d).ravel()
        ok = np.flatnonzero((nc <= room) & (nd + lam * (nc - room) + later[u] <= limit + margin))
        ok = ok[np.lexsort((nd[ok], nc[ok]))]
        prior = np.minimum.accumulate(np.concatenate(([np.inf], nd[ok][:-1])))
        ok = ok[nd[ok] < prior]
        kept += len(ok)
        if kept > FRONTIER_MAX_STATES or time.monotonic() > deadline:
            return None
        if not len(ok):
            return np.zeros(0, dtype=np.int64)
        sc, sd = nc[ok], nd[ok]
        trail.append(((ok // len(c)).astype(np.int32), (ok % len(c)).astype(np.int8)))
    state, pos = int(np.argmin(sd)), np.zeros(len(ccost), dtype=np.int64)
    for u in range(len(ccost) - 1, -1, -1):
        parent, option = trail[u]
        pos[u], state = option[state], parent[state]
    return pos


def _highs(xcost, xdmg, rhs, scale, time_limit) -> tuple[np.ndarray, bool] | None:
    """Binary program over the staircases; returns (position per unit, proven optimal) or None."""
    sizes = np.array([len(c) for c in xcost])
    unit, n = np.repeat(np.arange(len(sizes)), sizes), int(sizes.sum())
    c_obj = np.concatenate(xdmg) / scale
    w = np.concatenate(xcost) / max(rhs, np.finfo(float).tiny)
    one_each = csr_array((np.ones(n), (unit, np.arange(n))), shape=(len(sizes), n))
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(w[None, :], -np.inf, 1)]
    options = {"mip_rel_gap": 0.0, "time_limit": float(time_limit), "presolve": True,
               # HiGHS options scipy does not list; passed through verbatim (hence the warning filter)
               "mip_abs_gap": 0.0, "primal_feasibility_tolerance": 1e-10, "mip_feasibility_tolerance": 1e-10}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        res = milp(c_obj, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints, options=options)
    if res.x is None:
        return None
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    top = np.maximum.reduceat(res.x, offsets)  # each unit's largest x should be ~1
    if np.any(top < 0.5):
        return None
    choice = np.array([int(np.argmax(res.x[o:o + s])) for o, s in zip(offsets, sizes)])
    return choice, res.status == 0


def _solve_dp(cost, damage, room: float, stairs) -> Solution:
    """Exact dynamic programme over integer extra cost (cost above each unit's cheapest option).

    f[b] = least damage with extra cost <= b over the units so far; one [U, B+1] table of
    choices for the walk back. Costs are divided by their gcd first.
    """
    index, w, _ = stairs
    flat = w[np.isfinite(w)]
    if np.any(flat != np.round(flat)):
        raise ValueError("method='dp' needs integer costs; scale them to integers or use method='auto'")
    g = reduce(math.gcd, (int(v) for v in flat if v > 0), 0) or 1
    room_units, units = int(math.floor(room / g)), len(index)
    if units * (room_units + 1) > DP_MAX_CELLS:
        raise ValueError(f"method='dp' would need {units} x {room_units + 1} cells (max {DP_MAX_CELLS}); use 'auto'")
    f = np.zeros(room_units + 1)
    back = np.zeros((units, room_units + 1), dtype=np.int16)
    for u in range(units):
        new = np.full(room_units + 1, np.inf)
        for p in np.flatnonzero(index[u] >= 0):
            step = int(w[u, p] // g)
            if step > room_units:
                break  # the staircase is sorted by cost
            cand = f[: room_units + 1 - step] + damage[u, index[u, p]]
            better = cand < new[step:]
            new[step:][better], back[u, step:][better] = cand[better], p
        f = new
    choice, b = np.zeros(units, dtype=np.int64), room_units
    for u in range(units - 1, -1, -1):
        p = back[u, b]
        choice[u] = index[u, p]
        b -= int(w[u, p] // g)
    return _solution(choice, cost, damage, True, "dp")


def _total(values: np.ndarray, choice: np.ndarray) -> float:
    return float(values[np.arange(len(choice)), choice].sum())


def _solution(choice, cost, damage, optimal: bool, method: str) -> Solution:
    choice = np.array(choice, dtype=np.int64)
    choice.flags.writeable = False
    return Solution(choice, _total(cost, choice), _total(damage, choice), optimal, method)
