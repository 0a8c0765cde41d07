"""Run folders (runs), atomic I/O and strict JSON (io), seeding and RNG state (seed), logging (log), history /
TensorBoard / progress bars (tracking) and torchrun/DDP helpers (dist)."""
