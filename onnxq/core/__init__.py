"""The core model of quantization: specs and parameters, the QDQ contract, graph I/O, weighted
layers, observers, and the pass contract."""
