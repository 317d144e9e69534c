"""The kit's shared vocabulary and plumbing: imported by every other package, imports none.

- `common.contract`: names that cross a process boundary (model name, signatures, tensor
  names, file names), defined once.
- `common.configlib`: one config dataclass per stage (flags from fields, JSON beside the
  output, atomic writes, `pid_alive`).

Pure Python: nothing here imports TensorFlow, numpy, or model/, export/, serving/, mobile/
(tests/test_dependencies.py checks it). `mobile/` does not import it either: the Pi bundle
ships mobile/ alone.
"""
