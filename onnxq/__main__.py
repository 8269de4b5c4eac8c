from onnxq.cli import run

run()
