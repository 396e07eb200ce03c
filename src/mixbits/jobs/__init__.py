"""Experiments built from the pipeline's stages: `compare` (one job, many models) and `ablate`
(the SG-MPQ ablations on one model: strategies, training schedules, budgets). Each writes its
results atomically as they finish, so a failure midway loses no finished work, and `resume`
skips what is already done."""
