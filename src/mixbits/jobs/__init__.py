"""Job runners: each loads a model, cuts data, calls the stage packages downward, and writes files.

    analyze   `mixbits analyze`: sensitivity tables by several methods, validated on held-out text
    allocate  `mixbits allocate`: a saved damage table + strategies + a budget -> plans
    train     `mixbits train`: a saved plan -> a trained quantized model (Block-AP, E2E-QP)
    classify  `mixbits classify`: layer-wise quantization of a sentence classifier, by accuracy
    sweep     `mixbits sweep`: one damage table, every strategy x budget, scored
    iterative the iterative mode of `mixbits run` (walk units least-sensitive first to a ppl limit)
    compare   `mixbits compare`: one run per model, side by side
    ablate    `mixbits ablate` (+ ablate_sections, schedules, common): strategies, QAT schedules,
              budgets on one model
`mixbits.pipeline` (the `run` job) lives beside this package for now. Jobs sit above the stages
and `report`; no stage imports a job (the import-layer contract in pyproject.toml checks it).
The experiments write results atomically as they finish, so a failure midway loses no finished
work, and `resume` skips what is already done."""
