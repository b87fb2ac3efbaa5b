//! CUDA code generation that can be checked without a GPU.
//!
//! Every op of a program is lowered to one or more kernels in a small kernel
//! IR ([`kernel`]), built with [`builder::KernelBuilder`] and checked by
//! [`validate`]. The same IR value then goes three ways:
//!
//! - [`print`] writes it as CUDA C (`extern "C" __global__` functions);
//! - [`interp`] runs it on the CPU with CUDA's execution model (grid, blocks,
//!   shared memory, barriers, warps), so tests compare every kernel with the
//!   CPU reference kernels on small shapes;
//! - [`nvrtc`] compiles the printed source to PTX with NVRTC, loaded at run
//!   time through cudarc, so a machine without a GPU still proves that every
//!   kernel compiles.
//!
//! [`lower`] maps ops to kernels and lists the ops it covers.
//!
//! ```
//! use ldnc_codegen::cuda::{interp, lower, print};
//! use ldnc_ir::{Op, TensorType};
//!
//! let ty = TensorType::batched(&[2, 2, 3]);
//! let step = lower::lower_step(&Op::Relu, &[&ty], &ty).expect("relu lowers");
//! let source = print::print_kernel(&step.launches[0].kernel);
//! assert!(source.contains("extern \"C\" __global__ void __launch_bounds__(256) relu("));
//!
//! let x: Vec<f32> = (0..12).map(|v| v as f32 - 6.0).collect();
//! let mut y = vec![0.0; 12];
//! let scalars = interp::StepScalars { n: 1, seed: 0, lr: 0.0 };
//! interp::run_step(&step, &mut [x], &mut y, scalars).expect("relu runs");
//! assert_eq!(y[0], 0.0);
//! assert_eq!(y[11], 5.0);
//! ```

pub mod builder;
pub mod interp;
pub mod kernel;
pub mod lower;
pub mod nvrtc;
pub mod print;
pub mod validate;

/// The cudarc crate as this crate builds it (NVRTC and the driver API,
/// loaded at run time), so that an executor uses the same version and
/// features.
pub use cudarc;

/// Errors of CUDA code generation, interpretation and compilation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel `{kernel}` is invalid: {message}")]
    Invalid { kernel: String, message: String },
    #[error("op {op} cannot be lowered to CUDA: {message}")]
    Lower { op: &'static str, message: String },
    #[error(
        "kernel `{kernel}` failed in the interpreter at block ({}, {}, {}), thread ({}, {}, {}): {message}",
        block[0], block[1], block[2], thread[0], thread[1], thread[2]
    )]
    Interp {
        kernel: String,
        block: [u32; 3],
        thread: [u32; 3],
        message: String,
    },
    #[error("kernel `{kernel}` cannot be launched in the interpreter: {message}")]
    Launch { kernel: String, message: String },
    #[error("NVRTC failed to compile kernel `{kernel}` for {arch} with options {options:?} ({status}):\n{log}")]
    Nvrtc {
        kernel: String,
        arch: String,
        status: String,
        options: Vec<String>,
        log: String,
    },
    #[error("the NVRTC library could not be loaded: {0}")]
    NvrtcUnavailable(String),
}

pub type Result<T> = std::result::Result<T, Error>;
