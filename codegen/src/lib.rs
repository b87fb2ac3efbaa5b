//! `ldnc-codegen`: lowering of scheduled graphs to executable programs.

pub mod cpu;
pub mod cuda;
