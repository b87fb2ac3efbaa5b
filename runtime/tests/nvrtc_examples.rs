//! Every CUDA kernel of every example network's fused training and evaluation
//! programs compiles with NVRTC for sm_80 and sm_90.
//!
//! Where the NVRTC library cannot be loaded the test prints `SKIPPED` and passes,
//! unless `LDNC_REQUIRE_NVRTC=1` is set, as CI does.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use ldnc_codegen::cpu::lower;
use ldnc_codegen::cuda::{kernel::Kernel, lower::lower_program, nvrtc, print};
use ldnc_ir::program::Program;
use ldnc_ir::spec::NetSpec;
use ldnc_passes::pipeline;

/// The fused training and evaluation programs of `spec`.
fn programs(spec: &NetSpec) -> [Program; 2] {
    let options = pipeline::Options::default();
    let train = pipeline::training(spec, &options).unwrap().planned;
    let eval = pipeline::evaluation(spec, &options).unwrap();
    [train, eval].map(|p| lower(&p.graph, &p.schedule, &p.roots))
}

#[test]
fn every_example_kernel_compiles() {
    if let Err(reason) = nvrtc::available() {
        assert!(
            std::env::var("LDNC_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "LDNC_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {reason}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED every_example_kernel_compiles: {reason}"
        );
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    paths.sort();
    // Kernels are specialised to their shapes; one compile per distinct text.
    let mut seen = BTreeSet::new();
    let mut kernels: Vec<Kernel> = Vec::new();
    for path in &paths {
        let spec = NetSpec::load(path, &[]).unwrap();
        for program in programs(&spec) {
            let steps =
                lower_program(&program).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for launch in steps.iter().flat_map(|s| s.launches.iter()) {
                if seen.insert(print::print_kernel(&launch.kernel)) {
                    kernels.push(launch.kernel.clone());
                }
            }
        }
    }
    // One translation unit per chunk keeps NVRTC calls few; names are made
    // unique inside each unit.
    for chunk in kernels.chunks(400) {
        let renamed: Vec<Kernel> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut k = k.clone();
                k.name = format!("{}_{i}", k.name);
                k
            })
            .collect();
        let refs: Vec<&Kernel> = renamed.iter().collect();
        let source = print::print_module(&refs);
        for arch in [nvrtc::Arch::Sm80, nvrtc::Arch::Sm90] {
            nvrtc::compile_source("examples", &source, arch)
                .unwrap_or_else(|e| panic!("NVRTC failed for {arch}: {e}"));
        }
    }
    assert!(kernels.len() > 100, "only {} kernels", kernels.len());
}
