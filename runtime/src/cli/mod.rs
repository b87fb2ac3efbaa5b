//! Subcommands of the `ldnc` binary.

pub mod bench;
pub mod build;
pub mod compile;
pub mod inspect;
pub mod train;

use std::path::Path;

use anyhow::{Context, Result};
use ldnc_ir::spec::NetSpec;

/// Loads a network file with `--set` overrides applied and validated.
pub fn load_spec(path: &Path, overrides: &[String]) -> Result<NetSpec> {
    NetSpec::load(path, overrides)
        .with_context(|| format!("cannot load network {}", path.display()))
}
