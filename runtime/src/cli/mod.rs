//! Subcommands of the `ldnc` binary.

pub mod bench;
pub mod build;
pub mod compile;
pub mod export;
pub mod inspect;
pub mod spec_diff;
pub mod train;

use std::path::Path;

use anyhow::{Context, Result};
use ldnc_ir::spec::NetSpec;
use ldnc_ir::Error as IrError;

/// Loads a network file with `--set` overrides applied and validated. Errors
/// that already name the file are returned as they are, so that it is named once.
pub fn load_spec(path: &Path, overrides: &[String]) -> Result<NetSpec> {
    match NetSpec::load(path, overrides) {
        Ok(spec) => Ok(spec),
        Err(
            error @ (IrError::Io { .. }
            | IrError::Folder { .. }
            | IrError::NotText { .. }
            | IrError::Syntax { .. }),
        ) => Err(error.into()),
        Err(error) => Err(error).with_context(|| format!("cannot load network {}", path.display())),
    }
}

/// Parses a count flag such as `--batch` or `--epochs` that must be at least 1.
/// clap names the flag in front of the message.
pub fn parse_count(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(error) => Err(format!("expected a whole number of at least 1 ({error})")),
    }
}

/// Formats `count` with `noun`, adding an `s` unless the count is 1: "1 epoch",
/// "2 epochs".
pub fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}
