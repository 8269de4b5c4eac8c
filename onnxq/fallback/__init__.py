"""The accuracy target: keep the fewest ops float that bring a quantized model within ``--max-drop`` of the
float one (:mod:`onnxq.fallback.run`), ranked by a measured per-op sensitivity (:mod:`onnxq.fallback.search`
on :mod:`onnxq.fallback.switches`), judged by :mod:`onnxq.fallback.score`, written as an editable plan
(:mod:`onnxq.fallback.plan`)."""
