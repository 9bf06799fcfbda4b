"""quantcal.evaluate: tasks (HellaSwag, GSM8K, perplexity), scoring backends, benchmarks
and reports. Reads a model or the run directory's model.onnx; writes eval.json, report.md."""
