"""Quantization-aware training: Block-AP block by block, then optionally E2E-QP on the step sizes.

Entry point: `mixbits.train.run.train_model(model, plan, calib, val, TrainConfig(...), device=...)`
returns the trained quantized model and a `TrainReport` whose `.qparams` go to `save_native`.
Streamed from a lazy checkpoint, one block at a time: `streamed.train_streamed` (Block-AP into a
`NativeWriter`), then `e2e_streamed.train_e2e_streamed` (E2E-QP from the packed codes).
`mixbits.jobs.train.train_command` is the whole `mixbits train` job; `mixbits.config.TrainConfig`
holds the settings.
"""
