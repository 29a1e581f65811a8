//! Benchmarks of the sd-* crates' hot paths; run them with `cargo bench -p sd-benches`.
//! Each prints its time and, where it computes, its GFLOP/s and the fraction of this
//! machine's measured peak. This library target holds what the benchmarks share.
