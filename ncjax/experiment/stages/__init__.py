"""The stages a run can be: one module per run kind, each with ``run(ctx, run, done) -> Record``
(`ncjax.experiment.runner.STAGES` maps kinds to them). A stage imports the library and the
experiment modules below it, never the runner.

Submodules are imported on demand; this package imports nothing itself.
"""
