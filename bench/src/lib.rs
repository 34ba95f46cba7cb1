//! Shared helpers for the benchmark programs under `bench/src/bin/`.
