"""The Pi bundle under arm64 emulation (`make pi-smoke`): emulation.py builds and runs the
emulated userland, smoke.py checks the bundle in it against the same bundle on x86."""
