"""Budget -> plan: cost model, exact solver, seed strategies."""
