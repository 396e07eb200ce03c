"""Exact multiple-choice knapsack: one option per unit, least total damage within a budget.

Unit u (a layer, or a group of tied layers) has C options with stored cost ``cost[u, c]``
(bits) and predicted damage ``damage[u, c]``; ``inf`` in either marks an option unavailable.
With binary x[u, c]:

    minimise  sum_uc damage[u, c] x[u, c]
    s.t.      sum_c x[u, c] = 1  for every u,    sum_uc cost[u, c] x[u, c] <= budget.

A total counts as within the budget when it is at most ``budget + 1e-9 |budget|``, so that
sums taken in another order do not flip feasibility.

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
   unit by unit, pruned by the same Lagrangian bound (Nemhauser-Ullmann lists with bounding,
   as in Pisinger's MCKP algorithms). Sums are compared directly, so damages spanning
   1e-12 ... 1e3 need no tolerance. If the list grows past FRONTIER_MAX_STATES, or with
   method="milp", HiGHS branch-and-bound (scipy.optimize.milp) solves the core instead with
   gaps 0 and tight feasibility tolerances; its objective is divided by the core's G so the
   coefficients lie in [0, 1] and HiGHS's absolute tolerances track the damage at stake.
   Either answer is re-priced on the original arrays and checked against budget and G.

Trade-off: the list search is exact for any float costs and fast on sensitivity tables
(560 x 13 in tens of ms) but can grow on adversarial data, hence the HiGHS fallback, which
is slower here (~0.5 s) and whose HiGHS 1.12 build prints a stray debug line to stdout.
method="dp" is an independent exact dynamic programme over integer costs (time and memory
~ U x budget / gcd), kept for cross-checking on small instances.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

REL_TOL = 1e-9  # a total within budget * (1 + REL_TOL) fits
METHODS = ("auto", "milp", "dp")
DP_MAX_CELLS = 50_000_000  # units x budget states the dp may tabulate
FRONTIER_MAX_STATES = 200_000  # past this many states in one step, hand the core to HiGHS


class BudgetError(ValueError):
    """The budget is below the cheapest reachable total cost; the raw totals are attributes."""

    def __init__(self, budget: float, cheapest: float, richest: float) -> None:
        self.budget, self.cheapest, self.richest = float(budget), float(cheapest), float(richest)
        super().__init__(
            f"budget {budget:.10g} is below the cheapest reachable total cost {cheapest:.10g}; "
            f"reachable totals span [{cheapest:.10g}, {richest:.10g}]"
        )


@dataclass(frozen=True)
class Solution:
    """The chosen option per unit ([U] int), its total cost and damage on the original arrays,
    whether it is proven optimal, and which step produced it."""

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
    (integer costs only). `time_limit` (s) bounds HiGHS; hitting it gives optimal=False.
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
    fronts = _staircases(cost, damage)
    if method == "dp":
        return _solve_dp(cost, damage, budget + tol - cheapest, fronts)
    return _solve_exact(cost, damage, budget, fronts, method, time_limit)


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


def _staircases(cost: np.ndarray, damage: np.ndarray) -> list[np.ndarray]:
    """Per unit, the indices of its undominated options, cost ascending and damage strictly
    descending (an option matched or beaten on both by another never helps; of exact
    duplicates the first is kept)."""
    order = np.lexsort((damage, cost), axis=1)
    d = np.take_along_axis(damage, order, axis=1)
    prior = np.minimum.accumulate(np.concatenate((np.full((len(d), 1), np.inf), d[:, :-1]), axis=1), axis=1)
    keep = (d < prior) & np.isfinite(d)
    return [o[k] for o, k in zip(order, keep)]


def _hull(cost: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Positions on a staircase (cost up, damage down) that lie on its lower convex hull."""
    keep: list[int] = []
    for i in range(len(cost)):
        # drop the last kept point while it lies on or above the segment to point i
        while len(keep) >= 2:
            a, b = keep[-2], keep[-1]
            if (damage[b] - damage[a]) * (cost[i] - cost[a]) >= (damage[i] - damage[a]) * (cost[b] - cost[a]):
                keep.pop()
            else:
                break
        keep.append(i)
    return np.array(keep, dtype=np.int64)


def _lp_path(xcost: list[np.ndarray], xdmg: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Every hull step of every staircase as arrays (unit, target position, extra cost,
    efficiency = damage saved per extra cost), in the LP relaxation's order: best efficiency first."""
    unit, target, extra, eff, rank = [], [], [], [], []
    for u, (c, d) in enumerate(zip(xcost, xdmg)):
        h = _hull(c, d)
        e = (d[h[:-1]] - d[h[1:]]) / (c[h[1:]] - c[h[:-1]])
        eff.append(np.minimum.accumulate(e))  # rounding must not reorder a unit's own steps
        unit.append(np.full(len(e), u))
        target.append(h[1:])
        extra.append(c[h[1:]] - c[h[:-1]])
        rank.append(np.arange(len(e)))
    unit, target, extra, eff, rank = map(np.concatenate, (unit, target, extra, eff, rank))
    order = np.lexsort((rank, unit, -eff))
    return unit[order], target[order], extra[order], eff[order]


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


def _reduced(xcost, xdmg, pick, lam: float, slack: float, gap: float) -> list[np.ndarray]:
    """Per unit, which staircase positions can still be in an optimal answer (an exact test).

    For any lambda >= 0 and any x within the slack, sum e x >= sum_u min_c (e + lambda w)
    - lambda slack =: L, and forcing option (u, c) adds its reduced cost r = e + lambda w
    - min. An option with L + r above the greedy value G is in no optimal answer, nor is one
    whose excess damage alone exceeds G or whose extra cost exceeds the slack.
    """
    pen = [d + lam * c for c, d in zip(xcost, xdmg)]
    low = np.array([p.min() for p in pen])
    bound = float(low.sum()) - lam * slack
    margin = 1e-9 * (gap + lam * slack)  # far above rounding in `bound`; it only weakens the test
    keep = [
        ((p - m) + bound <= gap + margin) & (d <= gap) & (c <= slack)
        for c, d, p, m in zip(xcost, xdmg, pen, low)
    ]
    for k, p in zip(keep, pick):
        k[p] = True  # the greedy answer stays available whatever rounding did
    return keep


def _solve_exact(cost, damage, budget, fronts, method, time_limit) -> Solution:
    """Steps 3 and 4 of the module docstring on the staircases `fronts`."""
    tol = REL_TOL * abs(budget)
    units = np.arange(len(fronts))
    base = cost[units, [f[0] for f in fronts]]
    xcost = [cost[u, f] - base[u] for u, f in enumerate(fronts)]
    xdmg = [damage[u, f] - damage[u, f[-1]] for u, f in enumerate(fronts)]
    slack = budget - float(base.sum())
    pick, lam = _greedy(_lp_path(xcost, xdmg), len(fronts), slack)
    start = np.array([f[p] for f, p in zip(fronts, pick)])
    if all(d[p] == 0.0 for d, p in zip(xdmg, pick)):  # every unit at its least damage
        return _solution(start, cost, damage, True, "greedy")
    gap = float(sum(d[p] for d, p in zip(xdmg, pick)))
    keep = _reduced(xcost, xdmg, pick, lam, slack + tol, gap)
    free = [u for u in units if keep[u].sum() > 1]
    fixed = [u for u in units if keep[u].sum() == 1]
    # The core: free units only, each cost shifted so its cheapest remaining option costs 0.
    shift = [xcost[u][keep[u]].min() for u in free]
    ccost = [xcost[u][keep[u]] - s for u, s in zip(free, shift)]
    cdmg = [xdmg[u][keep[u]] for u in free]
    room = slack + tol - float(sum(xcost[u][pick[u]] for u in fixed)) - float(sum(shift))
    cgap = float(sum(xdmg[u][pick[u]] for u in free))
    choice, proven, used = start.copy(), True, "greedy"
    if free and cgap > 0.0:  # at cgap == 0 the greedy already reaches the core's least damage
        found = _frontier(ccost, cdmg, lam, room, cgap) if method == "auto" else None
        used = "frontier"
        if found is None:
            used, result = "milp", _highs(ccost, cdmg, room - tol / 2, cgap, time_limit)
            if result is None:
                return _solution(start, cost, damage, False, "greedy")
            found, proven = result
        choice[free] = [fronts[u][keep[u]][p] for u, p in zip(free, found)]
    if _total(cost, choice) > budget + tol or _total(damage, choice) > _total(damage, start):
        return _solution(start, cost, damage, False, "greedy")  # the search's answer failed the check
    return _solution(choice, cost, damage, proven, used)


def _frontier(ccost, cdmg, lam: float, room: float, gap: float) -> np.ndarray | None:
    """Exact search over the core: positions per unit, or None past FRONTIER_MAX_STATES.

    States are (cost, damage) of partial choices over the units so far. A state is dropped
    when it exceeds the room, when the Lagrangian bound of its best completion (its damage
    + lambda * (its cost - room) + the later units' min of e + lambda w) exceeds the greedy
    value, or when another state is no more costly and no more damaging.
    """
    low = np.array([(d + lam * c).min() for c, d in zip(ccost, cdmg)])
    later = np.concatenate((np.cumsum(low[::-1])[::-1][1:], [0.0]))
    margin = 1e-9 * (gap + lam * room)  # far above rounding in the bound; it only weakens the test
    sc, sd = np.zeros(1), np.zeros(1)
    trail = []  # per unit: (parent state, option position) of every state kept
    for u, (c, d) in enumerate(zip(ccost, cdmg)):
        nc, nd = (sc[:, None] + c).ravel(), (sd[:, None] + d).ravel()
        ok = np.flatnonzero((nc <= room) & (nd + lam * (nc - room) + later[u] <= gap + margin))
        ok = ok[np.lexsort((nd[ok], nc[ok]))]
        prior = np.minimum.accumulate(np.concatenate(([np.inf], nd[ok][:-1])))
        ok = ok[nd[ok] < prior]
        if len(ok) > FRONTIER_MAX_STATES:
            return None
        sc, sd = nc[ok], nd[ok]
        trail.append(divmod(ok, len(c)))
    state, pos = int(np.argmin(sd)), np.zeros(len(ccost), dtype=np.int64)
    for u in range(len(ccost) - 1, -1, -1):
        parent, option = trail[u]
        pos[u], state = option[state], parent[state]
    return pos


def _highs(xcost, xdmg, rhs, scale, time_limit) -> tuple[np.ndarray, bool] | None:
    """Binary program over the staircases; returns (position per unit, proven optimal) or None."""
    sizes = np.array([len(c) for c in xcost])
    unit = np.repeat(np.arange(len(sizes)), sizes)
    n = int(sizes.sum())
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
    pos = np.maximum.reduceat(res.x, offsets)  # each unit's largest x should be ~1
    if np.any(pos < 0.5):
        return None
    choice = np.array([int(np.argmax(res.x[o:o + s])) for o, s in zip(offsets, sizes)])
    return choice, res.status == 0


def _solve_dp(cost, damage, room: float, fronts) -> Solution:
    """Exact dynamic programme over integer extra cost (cost above each unit's cheapest option).

    f[b] = least damage with extra cost <= b over the units so far; one [U, B+1] table of
    choices for the walk back. Costs are divided by their gcd first.
    """
    base = np.array([cost[u, f[0]] for u, f in enumerate(fronts)])
    xcost = [cost[u, f] - base[u] for u, f in enumerate(fronts)]
    flat = np.concatenate(xcost)
    if np.any(flat != np.round(flat)) or np.any(base != np.round(base)):
        raise ValueError("method='dp' needs integer costs; scale them to integers or use method='milp'")
    g = reduce(math.gcd, (int(v) for v in flat if v > 0), 0) or 1
    room_units = int(math.floor(room / g))
    units = len(fronts)
    if units * (room_units + 1) > DP_MAX_CELLS:
        raise ValueError(
            f"method='dp' would tabulate {units} x {room_units + 1} states (limit {DP_MAX_CELLS}); use method='milp'"
        )
    f = np.zeros(room_units + 1)
    back = np.zeros((units, room_units + 1), dtype=np.int16)
    for u, front in enumerate(fronts):
        new = np.full(room_units + 1, np.inf)
        for p, (w, o) in enumerate(zip((xcost[u] // g).astype(np.int64), front)):
            if w > room_units:
                break  # the staircase is sorted by cost
            cand = f[: room_units + 1 - w] + damage[u, o]
            better = cand < new[w:]
            new[w:][better], back[u, w:][better] = cand[better], p
        f = new
    choice, b = np.zeros(units, dtype=np.int64), room_units
    for u in range(units - 1, -1, -1):
        p = back[u, b]
        choice[u] = fronts[u][p]
        b -= int(xcost[u][p] // g)
    return _solution(choice, cost, damage, True, "dp")


def _total(values: np.ndarray, choice: np.ndarray) -> float:
    return float(values[np.arange(len(choice)), choice].sum())


def _solution(choice, cost, damage, optimal: bool, method: str) -> Solution:
    choice = np.asarray(choice, dtype=np.int64)
    return Solution(choice, _total(cost, choice), _total(damage, choice), optimal, method)
