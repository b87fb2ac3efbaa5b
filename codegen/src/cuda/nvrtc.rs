//! Compiles printed kernels to PTX with NVRTC, the CUDA runtime compiler.
//!
//! cudarc loads `libnvrtc` when it is first used, so nothing CUDA is needed
//! to build this crate. [`available`] checks for the library first, because
//! cudarc panics when a call finds no library. The `nvidia-cuda-nvrtc-cu12`
//! wheel ships `libnvrtc.so.12` in `site-packages/nvidia/cuda_nvrtc/lib`,
//! which `LD_LIBRARY_PATH` must name.
//!
//! Kernels are compiled for a virtual architecture (`compute_80`), whose PTX
//! the driver compiles for the actual GPU when it loads the module.

use cudarc::nvrtc::{self, CompileError, CompileOptions};

use super::kernel::Kernel;
use super::print::print_kernel;
use super::{Error, Result};

/// A GPU architecture to compile for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere (A100): compute capability 8.0.
    Sm80,
    /// Hopper (H100, H200): compute capability 9.0.
    Sm90,
    /// Any other compute capability, as `major * 10 + minor`.
    Other(u32),
}

impl Arch {
    /// The architecture of a device with compute capability `major.minor`.
    pub fn from_capability(major: u32, minor: u32) -> Arch {
        match major * 10 + minor {
            80 => Arch::Sm80,
            90 => Arch::Sm90,
            other => Arch::Other(other),
        }
    }

    fn number(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
            Arch::Other(n) => n,
        }
    }

    /// The NVRTC option that selects the virtual architecture.
    pub fn option(self) -> String {
        format!("--gpu-architecture=compute_{}", self.number())
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}", self.number())
    }
}

/// Checks that the NVRTC library can be loaded, and returns the reason when
/// it cannot.
pub fn available() -> Result<()> {
    // SAFETY: `is_culib_present` only tries to open the library with
    // `dlopen` under cudarc's candidate names and closes what it opened; it
    // calls no function of the library.
    let present = unsafe { nvrtc::sys::is_culib_present() };
    if present {
        return Ok(());
    }
    let mut names = cudarc::get_lib_name_candidates("nvrtc");
    names.sort();
    names.dedup();
    Err(Error::NvrtcUnavailable(format!(
        "none of {} was found on the library path; install NVRTC (for example \
         `pip install nvidia-cuda-nvrtc-cu12`) and add its lib folder to LD_LIBRARY_PATH",
        names.join(", ")
    )))
}

/// Compiles CUDA C `source` (which defines `kernel`) to PTX for `arch`.
pub fn compile_source(kernel: &str, source: &str, arch: Arch) -> Result<String> {
    available()?;
    let opts = CompileOptions {
        options: vec![arch.option(), "--std=c++17".into()],
        name: Some(format!("{kernel}.cu")),
        ..Default::default()
    };
    match nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError {
            nvrtc,
            options,
            log,
        }) => Err(Error::Nvrtc {
            kernel: kernel.to_string(),
            arch: arch.to_string(),
            status: format!("{nvrtc:?}"),
            options,
            log: log.to_string_lossy().into_owned(),
        }),
        Err(other) => Err(Error::Nvrtc {
            kernel: kernel.to_string(),
            arch: arch.to_string(),
            status: format!("{other:?}"),
            options: vec![arch.option()],
            log: String::new(),
        }),
    }
}

/// Prints `kernel` and compiles it to PTX for `arch`.
pub fn compile(kernel: &Kernel, arch: Arch) -> Result<String> {
    compile_source(&kernel.name, &print_kernel(kernel), arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(Arch::Sm80.to_string(), "sm_80");
        assert_eq!(Arch::from_capability(9, 0), Arch::Sm90);
        assert_eq!(
            Arch::from_capability(8, 6).option(),
            "--gpu-architecture=compute_86"
        );
    }
}
