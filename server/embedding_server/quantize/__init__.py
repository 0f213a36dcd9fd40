"""int8 models with a measured fidelity gate (``embedding-quantize``, ``--quantize int8``).

Every MatMul with a constant weight becomes an integer matmul (MatMulIntegerToFloat)
with per-output-channel int8 weights and *per-row* uint8 activations: each
token row gets its own scale, so a text's vector does not depend on the other
rows of its batch (ONNX Runtime's dynamic quantization uses one scale per
batch, which made the same sentence's vector vary with its neighbours: min
cosine 0.989 in bench/quantize.py). The quantized model is compared with fp32 on a calibration set;
where a floor is missed the most sensitive MatMuls stay fp32 (fidelity.py,
core.py). Measured choices: bench/quantize.py.
"""
