"""quantcal.export: ONNX graph building, quantized-op emission, onnxruntime sessions and
parity checks. Reads run.json, qparams.safetensors and plan.json; writes model.onnx."""
