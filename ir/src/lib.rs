//! `ldnc-ir`: the network language, the tensor-graph IR and its analyses, and the
//! `Program` format that codegen produces and the runtime executes.
//!
//! Data flows one way through this crate:
//!
//! ```
//! use ldnc_ir::{expand, spec::NetSpec, Mode};
//!
//! let spec = NetSpec::from_ron("(blocks: [4, 4], growth: 8)", "inline.ron").unwrap();
//! spec.validate().unwrap();
//! let net = expand(&spec, Mode::Train).unwrap();
//! let report = ldnc_ir::analysis::Report::new(&spec, &net, 64).unwrap();
//! assert_eq!(report.feature_layers, 8);
//! ```
//!
//! Invariants: this crate does no I/O except `NetSpec::load` and program
//! (de)serialisation; graphs are built in topological order and every node's type
//! was checked by its op's shape rule when it was added.

pub mod analysis;
pub mod expand;
pub mod features;
pub mod graph;
pub mod op;
pub mod program;
pub mod spec;
pub mod templates;

pub use expand::{expand, Mode, Network, CLASS_WEIGHTS};
pub use graph::{Graph, TensorType, ValueId};
pub use op::{Init, Op, Role};

/// Errors of the IR crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a folder; pass a network file (.ron), e.g. examples/quickstart.ron")]
    Folder { path: String },
    #[error(
        "{path} is not a RON text file but a binary file, e.g. a checkpoint; pass a network \
         file (.ron), e.g. examples/quickstart.ron"
    )]
    NotText { path: String },
    #[error("{file}:{line}:{column}: {message}\n  hint: {hint}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
        hint: String,
    },
    #[error("invalid `--set {item}`: {message}")]
    Override { item: String, message: String },
    #[error("invalid network spec, field `{field}`: {message}")]
    InvalidSpec { field: String, message: String },
    #[error("shape error at {node} ({op}): {message}")]
    Shape {
        node: String,
        op: String,
        message: String,
    },
    #[error("the feature graph is disconnected: layer {from} cannot reach layer {to}")]
    Disconnected { from: usize, to: usize },
    #[error("{what} is not supported yet")]
    Unsupported { what: String },
    #[error("invalid program: {0}")]
    Program(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
