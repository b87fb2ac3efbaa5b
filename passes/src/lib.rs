//! `ldnc-passes`: the compiler passes between the forward IR and a program.
//!
//! `autodiff` builds the training graph (forward, backward and optimizer updates)
//! from a network expanded in training mode; `fuse` rewrites it with egg so the
//! bottleneck, transition and concatenation ops fuse; `remat` recomputes cheap
//! forward values in the backward pass; `memory` assigns values to shared
//! buffers by liveness; `pipeline` runs them in order for a network spec.

pub mod autodiff;
pub mod fuse;
pub mod memory;
pub mod pipeline;
pub mod remat;

/// Errors of the compiler passes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ir(#[from] ldnc_ir::Error),
    #[error("autodiff failed at {node}: {message}")]
    Autodiff { node: String, message: String },
    #[error("parameter {param} does not influence the loss, so it would never train")]
    NoGradient { param: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
