//! Compiles every kernel that codegen lowers with NVRTC for sm_80 and sm_90.
//!
//! NVRTC is loaded at run time. Where the library cannot be loaded, the test
//! writes a line saying it was skipped and why, and passes, unless the
//! environment variable `LDNC_REQUIRE_NVRTC=1` is set, in which case it
//! fails. With the `nvidia-cuda-nvrtc-cu12` wheel installed, pointing
//! `LD_LIBRARY_PATH` at its `nvidia/cuda_nvrtc/lib` folder is enough.

use std::collections::BTreeMap;
use std::io::Write;

use ldnc_codegen::cuda::lower;
use ldnc_codegen::cuda::nvrtc::{self, Arch};
use ldnc_codegen::cuda::print::print_kernel;
use ldnc_codegen::cuda::Error;
use ldnc_ir::{Op, TensorType};

/// Whether NVRTC can be used; otherwise reports the skip, or panics when
/// `LDNC_REQUIRE_NVRTC=1`.
fn nvrtc_or_skip(test: &str) -> bool {
    let Err(reason) = nvrtc::available() else {
        return true;
    };
    if std::env::var("LDNC_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("{test}: LDNC_REQUIRE_NVRTC=1 is set, but {reason}");
    }
    // Written to stderr directly, which the test harness does not capture,
    // so the skip shows in every run.
    let _ = writeln!(std::io::stderr(), "\nSKIPPED {test}: {reason}");
    false
}

/// One instance of every op that lowers, with shapes that exercise the
/// optional parts (ignore labels, class weights, Nesterov momentum).
fn sample_ops() -> Vec<(Op, Vec<TensorType>)> {
    let img = TensorType::batched(&[5, 7, 3]);
    let small = TensorType::batched(&[3, 4, 3]);
    let vec = |c: usize| TensorType::batched(&[c]);
    let fixed = TensorType::fixed;
    let stats = fixed(&[2, 3]);
    let w = fixed(&[3, 3, 3, 4]);
    let conv_out = TensorType::batched(&[3, 4, 4]);
    let up = TensorType::batched(&[6, 8, 4]);
    let logits = TensorType::batched(&[5, 7, 6]);
    let labels = TensorType::batched(&[5, 7]);
    let weights = fixed(&[6]);
    // The fused ops read the concatenation of `img` and `part`, 5 channels.
    let part = TensorType::batched(&[5, 7, 2]);
    let concat = TensorType::batched(&[5, 7, 5]);
    let fused_stats = fixed(&[2, 5]);
    vec![
        (Op::Relu, vec![img.clone()]),
        (Op::ReluBackward, vec![img.clone(), img.clone()]),
        (Op::Scale { factor: 0.5 }, vec![img.clone()]),
        (Op::Mul, vec![img.clone(), img.clone()]),
        (Op::Sum, vec![img.clone(), img.clone(), img.clone()]),
        (Op::DropoutMask { p: 0.2 }, vec![img.clone()]),
        (
            Op::Concat,
            vec![img.clone(), TensorType::batched(&[5, 7, 2])],
        ),
        (Op::Slice { start: 1, len: 2 }, vec![img.clone()]),
        (Op::Crop { h: 4, w: 6 }, vec![img.clone()]),
        (Op::CropBackward { h: 6, w: 8 }, vec![img.clone()]),
        (Op::SumBatch, vec![img.clone()]),
        (Op::BnStats, vec![img.clone()]),
        (
            Op::BnApply { eps: 1e-5 },
            vec![img.clone(), stats.clone(), stats.clone()],
        ),
        (
            Op::BnBackward { eps: 1e-5 },
            vec![img.clone(), stats.clone(), stats.clone(), img.clone()],
        ),
        (
            Op::BnAffineGrad { eps: 1e-5 },
            vec![img.clone(), stats.clone(), img.clone()],
        ),
        (
            Op::AvgPool {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![img.clone()],
        ),
        (
            Op::MaxPool {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![img.clone()],
        ),
        (
            Op::AvgPoolBackward {
                k: 3,
                stride: 2,
                pad: 1,
                in_h: 5,
                in_w: 7,
            },
            vec![small.clone()],
        ),
        (
            Op::MaxPoolBackward {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![img.clone(), small.clone()],
        ),
        (Op::GlobalAvgPool, vec![img.clone()]),
        (Op::GlobalAvgPoolBackward { h: 5, w: 7 }, vec![vec(3)]),
        (Op::Linear, vec![vec(3), fixed(&[3, 10]), fixed(&[10])]),
        (Op::LinearBackwardData, vec![vec(10), fixed(&[3, 10])]),
        (Op::LinearBackwardWeight, vec![vec(3), vec(10)]),
        (
            Op::SoftmaxCrossEntropy {
                ignore: Some(6),
                weighted: true,
            },
            vec![logits.clone(), labels.clone(), weights.clone()],
        ),
        (
            Op::SoftmaxCrossEntropyBackward {
                weight: 0.5,
                ignore: None,
                weighted: true,
            },
            vec![logits.clone(), labels.clone(), weights],
        ),
        (
            Op::SgdUpdate {
                momentum: 0.9,
                weight_decay: 1e-4,
                nesterov: true,
            },
            vec![w.clone(), w.clone(), w.clone()],
        ),
        (
            Op::RmsPropUpdate {
                decay: 0.9,
                eps: 1e-6,
                weight_decay: 1e-4,
            },
            vec![fixed(&[40]), fixed(&[40]), fixed(&[40])],
        ),
        (
            Op::BnRunningUpdate {
                momentum: 0.1,
                per_item: 35,
            },
            vec![stats.clone(), stats.clone()],
        ),
        (
            Op::Conv2d {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![img.clone(), w.clone()],
        ),
        (
            Op::Conv2dBackwardData {
                k: 3,
                stride: 2,
                pad: 1,
                in_h: 5,
                in_w: 7,
            },
            vec![conv_out.clone(), w.clone()],
        ),
        (
            Op::Conv2dBackwardFilter {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![img.clone(), conv_out.clone()],
        ),
        (
            Op::ConvTranspose2d {
                k: 3,
                stride: 2,
                pad: 1,
                out_pad: 1,
            },
            vec![small.clone(), fixed(&[3, 3, 3, 4])],
        ),
        (
            Op::ConvTranspose2dBackwardData {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![up.clone(), fixed(&[3, 3, 3, 4])],
        ),
        (
            Op::ConvTranspose2dBackwardFilter {
                k: 3,
                stride: 2,
                pad: 1,
            },
            vec![small, up],
        ),
        (
            Op::ConcatStats,
            vec![stats.clone(), fixed(&[2, 2]), fixed(&[2, 1])],
        ),
        (
            Op::BnReluConv {
                k: 3,
                stride: 1,
                pad: 1,
                eps: 1e-5,
            },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                fixed(&[3, 3, 5, 4]),
            ],
        ),
        (
            Op::BnReluConv {
                k: 1,
                stride: 2,
                pad: 0,
                eps: 1e-5,
            },
            vec![
                img.clone(),
                part.clone(),
                TensorType::batched(&[5, 7, 1]),
                fixed(&[2, 6]),
                fixed(&[2, 6]),
                fixed(&[1, 1, 6, 4]),
            ],
        ),
        (
            Op::BnReluConvBackwardFilter {
                k: 3,
                stride: 2,
                pad: 1,
                eps: 1e-5,
            },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                conv_out,
            ],
        ),
        (
            Op::BnReluBackward { eps: 1e-5 },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                concat.clone(),
            ],
        ),
        (
            // The gradient of `part`, channels 3..5 of the concatenation.
            Op::BnReluBackwardPart {
                eps: 1e-5,
                start: 3,
            },
            vec![
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                concat.clone(),
            ],
        ),
        (
            Op::BnReluGlobalAvgPool { eps: 1e-5 },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
            ],
        ),
        (
            Op::BnReluAvgPool {
                k: 2,
                stride: 2,
                pad: 0,
                eps: 1e-5,
            },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
            ],
        ),
        (
            Op::BnReluConvBias {
                k: 3,
                stride: 1,
                pad: 1,
                eps: 1e-5,
                relu: true,
            },
            vec![
                img.clone(),
                part.clone(),
                fused_stats.clone(),
                fused_stats.clone(),
                fixed(&[3, 3, 5, 4]),
                fixed(&[4]),
            ],
        ),
        (
            Op::Conv2dBias {
                k: 3,
                stride: 2,
                pad: 1,
                relu: false,
            },
            vec![img.clone(), w.clone(), fixed(&[4])],
        ),
        (
            Op::BnFoldWeight { eps: 1e-5 },
            vec![w.clone(), fixed(&[2, 4]), fixed(&[2, 4])],
        ),
        (
            Op::BnFoldBias { eps: 1e-5 },
            vec![fixed(&[2, 4]), fixed(&[2, 4])],
        ),
        (
            Op::BnReluAffineGrad { eps: 1e-5 },
            vec![img, part, fused_stats.clone(), fused_stats, concat],
        ),
    ]
}

/// Printed source of every lowered kernel, keyed by kernel name and a counter.
fn all_sources() -> BTreeMap<String, String> {
    let mut sources = BTreeMap::new();
    for (op, inputs) in sample_ops() {
        let types: Vec<&TensorType> = inputs.iter().collect();
        let out = op
            .infer(&types)
            .unwrap_or_else(|e| panic!("sample {}: {e}", op.name()));
        let step = lower::lower_step(&op, &types, &out).unwrap_or_else(|e| panic!("{e}"));
        for launch in &step.launches {
            let key = format!("{}#{}", launch.kernel.name, sources.len());
            sources.insert(key, print_kernel(&launch.kernel));
        }
    }
    sources
}

#[test]
fn samples_cover_every_lowering() {
    let names: Vec<String> = all_sources()
        .keys()
        .map(|k| k.split('#').next().unwrap_or("").to_string())
        .collect();
    for expected in [
        "conv2d",
        "conv_transpose2d_backward_filter",
        "bn_stats",
        "softmax_cross_entropy_weight",
        "concat_stats",
        "bn_relu_conv",
        "bn_relu_conv_backward_filter",
        "bn_relu_backward",
        "bn_relu_backward_part",
        "bn_relu_affine_grad",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no sample lowers to `{expected}`"
        );
    }
    assert!(names.len() >= 41, "only {} kernels sampled", names.len());
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    let sources = all_sources();
    let mut failures = Vec::new();
    for arch in [Arch::Sm80, Arch::Sm90] {
        for (key, source) in &sources {
            let name = key.split('#').next().unwrap_or(key);
            match nvrtc::compile_source(name, source, arch) {
                Ok(ptx) => assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "PTX of `{name}` for {arch} has no entry point `{name}`"
                ),
                Err(e) => failures.push(format!("{e}\n--- source ---\n{source}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} kernels failed to compile:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn compile_error_carries_log_and_options() {
    if !nvrtc_or_skip("compile_error_carries_log_and_options") {
        return;
    }
    let source = "extern \"C\" __global__ void broken(float* y) { y[0] = missing_name; }";
    let err =
        nvrtc::compile_source("broken", source, Arch::Sm80).expect_err("the source is invalid");
    let Error::Nvrtc {
        kernel,
        log,
        options,
        ..
    } = &err
    else {
        panic!("expected an NVRTC compile error, got {err}");
    };
    assert_eq!(kernel, "broken");
    assert!(log.contains("missing_name"), "log: {log}");
    assert!(
        options.iter().any(|o| o == "--gpu-architecture=compute_80"),
        "options: {options:?}"
    );
}

use ldnc_runtime::cuda_exec;

#[test]
fn cuda_executor_without_driver_says_use_cpu() {
    // SAFETY: `is_culib_present` only tries to `dlopen` the driver library.
    let driver = unsafe { ldnc_codegen::cuda::cudarc::driver::sys::is_culib_present() };
    if driver {
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED cuda_executor_without_driver_says_use_cpu: a CUDA driver is present"
        );
        return;
    }
    let program = ldnc_ir::program::Program {
        format_version: ldnc_ir::program::FORMAT_VERSION,
        values: Vec::new(),
        buffers: Vec::new(),
        steps: Vec::new(),
        image: 0,
        label: 0,
        loss: 0,
        logits: Vec::new(),
    };
    let err = cuda_exec::CudaExecutor::new(program, 1)
        .err()
        .expect("no driver on this machine");
    let text = err.to_string();
    assert!(text.starts_with("no CUDA driver found: "), "{text}");
    assert!(text.ends_with("; use --device cpu"), "{text}");
}

/// Loaded kernels by printed source.
type Functions =
    std::collections::HashMap<String, ldnc_codegen::cuda::cudarc::driver::CudaFunction>;

/// Runs a lowered step on the GPU: uploads `inputs`, launches every kernel
/// (compiling those not in `cache`) and returns the output and the operands
/// after the step.
fn gpu_run_step(
    stream: &std::sync::Arc<ldnc_codegen::cuda::cudarc::driver::CudaStream>,
    arch: Arch,
    cache: &mut Functions,
    step: &lower::LoweredStep,
    inputs: &[Vec<f32>],
    out_len: usize,
    (n, seed, lr): (usize, u64, f32),
) -> Result<(Vec<f32>, Vec<Vec<f32>>), String> {
    use ldnc_codegen::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use ldnc_codegen::cuda::cudarc::nvrtc::Ptx;
    use ldnc_codegen::cuda::interp::{launch_grid, Arg};
    use lower::Binding;

    let ctx = stream.context();
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let upload = |v: &[f32]| {
        let padded = if v.is_empty() { vec![0.0] } else { v.to_vec() };
        stream.clone_htod(&padded).map_err(|e| text(&e))
    };
    let operands = inputs
        .iter()
        .map(|v| upload(v))
        .collect::<Result<Vec<_>, _>>()?;
    let output = upload(&vec![f32::NAN; out_len])?;
    let scratch = step
        .scratch
        .iter()
        .map(|&len| upload(&vec![f32::NAN; len]))
        .collect::<Result<Vec<_>, _>>()?;
    let n32 = n as i32;

    for launch in &step.launches {
        let kernel = &launch.kernel;
        let source = ldnc_codegen::cuda::print::print_kernel(kernel);
        if !cache.contains_key(&source) {
            let ptx = nvrtc::compile(kernel, arch).map_err(|e| text(&e))?;
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| text(&e))?;
            let function = module.load_function(&kernel.name).map_err(|e| text(&e))?;
            cache.insert(source.clone(), function);
        }
        let function = &cache[&source];
        let mut shape_args: Vec<Arg> = launch
            .args
            .iter()
            .map(|b| match b {
                Binding::Batch => Arg::I32(n32),
                Binding::Seed => Arg::U64(seed),
                Binding::LearningRate => Arg::F32(lr),
                _ => Arg::Buffer(Vec::new()),
            })
            .collect();
        let [gx, gy, gz] = launch_grid(kernel, &mut shape_args).map_err(|e| text(&e))?;
        let mut builder = stream.launch_builder(function);
        for binding in &launch.args {
            match binding {
                Binding::Input(i) => builder.arg(&operands[*i]),
                Binding::Output => builder.arg(&output),
                Binding::Scratch(j) => builder.arg(&scratch[*j]),
                Binding::Batch => builder.arg(&n32),
                Binding::Seed => builder.arg(&seed),
                Binding::LearningRate => builder.arg(&lr),
            };
        }
        let config = LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (kernel.block[0], kernel.block[1], kernel.block[2]),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments follow the kernel's parameters in order and
        // type, and every buffer contains the elements of its value at batch `n`.
        unsafe { builder.launch(config) }.map_err(|e| text(&e))?;
    }
    let out = stream.clone_dtoh(&output).map_err(|e| text(&e))?;
    let after = operands
        .iter()
        .map(|o| stream.clone_dtoh(o).map_err(|e| text(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((out, after))
}

/// Opens device 0 for the GPU tests, or reports the skip; with
/// `LDNC_REQUIRE_GPU=1` a missing GPU fails the test.
fn gpu_or_skip(
    test: &str,
) -> Option<(
    std::sync::Arc<ldnc_codegen::cuda::cudarc::driver::CudaStream>,
    Arch,
)> {
    use ldnc_codegen::cuda::cudarc::driver::CudaContext;
    // SAFETY: `is_culib_present` only tries to `dlopen` the driver library.
    let driver = unsafe { ldnc_codegen::cuda::cudarc::driver::sys::is_culib_present() };
    let opened = if driver {
        CudaContext::new(0).map_err(|e| e.to_string())
    } else {
        Err("no CUDA driver".into())
    };
    let ctx = match opened {
        Ok(ctx) => ctx,
        Err(reason) => {
            if std::env::var("LDNC_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: LDNC_REQUIRE_GPU=1 is set, but {reason}");
            }
            let _ = writeln!(std::io::stderr(), "\nSKIPPED {test}: {reason}");
            return None;
        }
    };
    let (major, minor) = ctx
        .compute_capability()
        .expect("the device reports its compute capability");
    Some((
        ctx.default_stream(),
        Arch::from_capability(major as u32, minor as u32),
    ))
}

/// Runs every sample op with `run` and compares it with the CPU reference at
/// batch 3; returns one line per mismatch or failure.
fn compare_samples(
    mut run: impl FnMut(&lower::LoweredStep, &[Vec<f32>], usize) -> Result<Vec<f32>, String>,
) -> Vec<String> {
    use ldnc_runtime::kernels::{Ctx, In, KernelSet};
    let n = 3;
    let mut failures = Vec::new();
    for (k, (op, types)) in sample_ops().into_iter().enumerate() {
        if op.role() != ldnc_ir::op::Role::Compute {
            continue;
        }
        let refs: Vec<&TensorType> = types.iter().collect();
        let out_ty = op.infer(&refs).expect("samples are well typed");
        let inputs: Vec<Vec<f32>> = types
            .iter()
            .enumerate()
            .map(|(i, t)| sample_data(&op, (i, types.len()), t.numel(n), k as u64))
            .collect();
        let ins: Vec<In> = inputs
            .iter()
            .zip(&types)
            .map(|(d, t)| In { data: d, ty: t })
            .collect();
        let mut expected = vec![0.0; out_ty.numel(n)];
        KernelSet::Reference
            .compute(&op, &ins, &mut expected, &out_ty, &Ctx { n, seed: 7 })
            .expect("the reference runs every sample");
        let step = lower::lower_step(&op, &refs, &out_ty).expect("every sample lowers");
        match run(&step, &inputs, expected.len()) {
            Ok(actual) => {
                let bad = actual
                    .iter()
                    .zip(&expected)
                    .position(|(a, e)| (a - e).abs() > 1e-3 * (1.0 + e.abs()));
                if let Some(i) = bad {
                    failures.push(format!(
                        "{}: element {i} is {}, reference {}",
                        op.name(),
                        actual[i],
                        expected[i]
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", op.name())),
        }
    }
    failures
}

/// The samples under the interpreter, which checks the sample data before a
/// GPU run depends on it.
#[test]
fn sample_kernels_match_reference_in_interpreter() {
    use ldnc_codegen::cuda::interp::{run_step, StepScalars};
    let failures = compare_samples(|step, inputs, out_len| {
        let mut buffers = inputs.to_vec();
        let mut out = vec![f32::NAN; out_len];
        let scalars = StepScalars {
            n: 3,
            seed: 7,
            lr: 0.0,
        };
        run_step(step, &mut buffers, &mut out, scalars).map_err(|e| e.to_string())?;
        Ok(out)
    });
    assert!(
        failures.is_empty(),
        "interpreted kernels differ:\n{}",
        failures.join("\n")
    );
}

/// Every sample kernel on the real GPU against the CPU reference.
#[test]
fn gpu_kernels_match_reference() {
    if !nvrtc_or_skip("gpu_kernels_match_reference") {
        return;
    }
    let Some((stream, arch)) = gpu_or_skip("gpu_kernels_match_reference") else {
        return;
    };
    let mut cache = Functions::new();
    let failures = compare_samples(|step, inputs, out_len| {
        gpu_run_step(
            &stream,
            arch,
            &mut cache,
            step,
            inputs,
            out_len,
            (3, 7, 0.0),
        )
        .map(|r| r.0)
    });
    assert!(
        failures.is_empty(),
        "GPU kernels differ from the reference:\n{}",
        failures.join("\n")
    );
}

/// Valid data for operand `i` of the `count` operands of sample `op`: class
/// indices for labels, positive class weights, RMSprop mean squares and
/// batch-norm variances.
fn sample_data(op: &Op, (i, count): (usize, usize), len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(31).wrapping_add(i as u64);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let is_loss = matches!(
        op,
        Op::SoftmaxCrossEntropy { .. } | Op::SoftmaxCrossEntropyBackward { .. }
    );
    let is_rmsprop = matches!(op, Op::RmsPropUpdate { .. });
    let is_fused = matches!(
        op,
        Op::BnReluConv { .. }
            | Op::BnReluConvBackwardFilter { .. }
            | Op::BnReluBackward { .. }
            | Op::BnReluAffineGrad { .. }
    );
    // The fused ops take their statistics after the inputs x_1 .. x_m, as
    // the third operand from the end. They are the fourth in
    // `BnReluConvBias`, where a bias follows the weight, and in
    // `BnReluBackwardPart`, where the affine gradient precedes dz. They are
    // the second when nothing follows the affine parameters.
    let is_stats = (matches!(
        op,
        Op::BnApply { .. }
            | Op::BnBackward { .. }
            | Op::BnAffineGrad { .. }
            | Op::BnFoldWeight { .. }
    ) && i == 1)
        || (matches!(op, Op::BnFoldBias { .. }) && i == 0)
        || (is_fused && i + 3 == count)
        || (matches!(
            op,
            Op::BnReluConvBias { .. } | Op::BnReluBackwardPart { .. }
        ) && i + 4 == count)
        || (matches!(
            op,
            Op::BnReluGlobalAvgPool { .. } | Op::BnReluAvgPool { .. }
        ) && i + 2 == count);
    (0..len)
        .map(|_| {
            if is_loss && i == 1 {
                (next() * 6.0).floor()
            } else if is_stats || (is_loss && i == 2) || (is_rmsprop && i == 2) {
                next() + 0.5
            } else {
                next() * 2.0 - 1.0
            }
        })
        .collect()
}

/// Times the conv2d kernel at a DenseNet-like 3x3 shape; run with
/// `--ignored --nocapture` on a GPU machine.
#[test]
#[ignore = "benchmark: needs a GPU and prints timings"]
fn gpu_conv2d_benchmark() {
    let Some((stream, arch)) = gpu_or_skip("gpu_conv2d_benchmark") else {
        return;
    };
    for (n, hw, cin, cout) in [(64, 32, 128, 32), (64, 16, 256, 32), (64, 8, 512, 128)] {
        let x_ty = TensorType::batched(&[hw, hw, cin]);
        let w_ty = TensorType::fixed(&[3, 3, cin, cout]);
        let op = Op::Conv2d {
            k: 3,
            stride: 1,
            pad: 1,
        };
        let out_ty = op.infer(&[&x_ty, &w_ty]).expect("valid conv");
        let step = lower::lower_step(&op, &[&x_ty, &w_ty], &out_ty).expect("conv lowers");
        let inputs = vec![vec![0.5; x_ty.numel(n)], vec![0.25; w_ty.numel(n)]];
        let out_len = out_ty.numel(n);
        // The first run compiles and warms up; the later ones are timed.
        let mut cache = Functions::new();
        gpu_run_step(
            &stream,
            arch,
            &mut cache,
            &step,
            &inputs,
            out_len,
            (n, 0, 0.0),
        )
        .expect("warm-up run");
        let start = std::time::Instant::now();
        let runs = 5;
        for _ in 0..runs {
            gpu_run_step(
                &stream,
                arch,
                &mut cache,
                &step,
                &inputs,
                out_len,
                (n, 0, 0.0),
            )
            .expect("timed run");
        }
        let seconds = start.elapsed().as_secs_f64() / runs as f64;
        let flops = 2.0 * (n * hw * hw * cout * 9 * cin) as f64;
        println!(
            "conv2d 3x3 n={n} {hw}x{hw} {cin}->{cout}: {:.2} ms per step including host copies, {:.1} GFLOP/s (a lower bound on the kernel's rate)",
            seconds * 1e3,
            flops / seconds / 1e9
        );
    }
}
