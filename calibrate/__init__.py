"""quantcal.calibrate: data sets, observers, forward hooks, weight quantizers, sensitivity
and the planner. Reads a model and text; writes run.json, stats.safetensors,
qparams.safetensors, sensitivity.json and plan.json into the run directory."""
