//! `ldnc-runtime`: executes compiled programs on the CPU, reads datasets, trains
//! and evaluates networks, and writes checkpoints, metrics and plots.
//!
//! The library depends on `ldnc-ir` only; the `ldnc` binary in this package is the
//! one place that also links the compiler passes and codegen.

pub mod checkpoint;
// NOTE: the CUDA executor lowers programs through `ldnc-codegen`, so this library
// links codegen; carrying the CUDA sources inside `Program` would remove that.
pub mod cuda_exec;
pub mod data;
pub mod exec;
pub mod export;
pub mod freeze;
pub mod kernels;
pub mod metrics;
pub mod optim;
pub mod payload;
pub mod plot;
pub mod store;
pub mod train;
