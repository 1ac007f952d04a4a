"""Memory and layout planner (`moe plan`): per-rank memory from the model config alone, layouts ranked by an
estimated step time, and the start-up check `check_fits` that `moe train` runs before loading weights."""
