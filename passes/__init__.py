"""Graph passes of onnxq, installed as ``onnxq.passes``. See README.md in this folder."""
