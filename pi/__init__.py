"""The development-machine side of the Raspberry Pi: tools that build, measure and try what
mobile/ ships, never shipped themselves.

- `bundle`       `make pi-bundle`: the archive for the Pi (mobile/, the model, labels, a README).
- `bench_mobile` `make bench-mobile`: accuracy per TFLite variant and on photos, CLI latency.
- `emulation`    arm64 Raspberry Pi OS userlands (mmdebstrap) and wheels, run under qemu-user.
- `smoke`        `make pi-smoke`: the bundle installed and run in those userlands.

They may import common/, model/ (the IDX reader, synthetic pictures), export/ (PNG encoding) and
mobile/, never serving/ or tests/ (tests/test_dependencies.py checks it).
"""
