//! Every CUDA kernel that codegen lowers, run under the kernel-IR
//! interpreter and compared with the CPU reference kernels on random small
//! shapes. Shapes are drawn so that none divides the 64 x 64 x 8 GEMM tiles
//! or the 256-thread blocks, and data come from a seeded generator, so a
//! failure reproduces from the proptest seed alone.
//!
//! Tolerances: the reference accumulates in f64 and the kernels in f32, so
//! results agree to a relative error of about 1e-4 on these sizes; the
//! dropout mask and max pooling must agree exactly.

use ldnc_codegen::cuda::builder::KernelBuilder;
use ldnc_codegen::cuda::interp::{self, StepScalars};
use ldnc_codegen::cuda::kernel::{thread_idx, Axis};
use ldnc_codegen::cuda::lower;
use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::{Ctx, In, KernelSet};
use ldnc_runtime::optim;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Deterministic values in `[-1, 1)` from a seed (SplitMix64 increments).
fn data(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Values on a coarse grid, so that max-pooling windows contain ties.
fn coarse(seed: u64, len: usize) -> Vec<f32> {
    data(seed, len)
        .into_iter()
        .map(|v| (v * 3.0).round())
        .collect()
}

/// One operand: its type and data at batch `n`.
#[derive(Clone)]
struct Operand {
    ty: TensorType,
    data: Vec<f32>,
}

fn operand(ty: TensorType, n: usize, seed: u64) -> Operand {
    let data = data(seed, ty.numel(n));
    Operand { ty, data }
}

/// Runs `op` under the interpreter and the reference and compares the
/// results within `tol` relative to `1 + |reference|`.
fn check(
    op: &Op,
    operands: &[Operand],
    n: usize,
    seed: u64,
    tol: f32,
) -> Result<(), TestCaseError> {
    let types: Vec<&TensorType> = operands.iter().map(|o| &o.ty).collect();
    let out_ty = op
        .infer(&types)
        .map_err(|e| TestCaseError::fail(format!("{}: {e}", op.name())))?;

    let mut expected = vec![0.0; out_ty.numel(n)];
    let inputs: Vec<In> = operands
        .iter()
        .map(|o| In {
            data: &o.data,
            ty: &o.ty,
        })
        .collect();
    KernelSet::Reference
        .compute(op, &inputs, &mut expected, &out_ty, &Ctx { n, seed })
        .map_err(|e| TestCaseError::fail(format!("reference {}: {e}", op.name())))?;

    let step = lower::lower_step(op, &types, &out_ty)
        .map_err(|e| TestCaseError::fail(format!("lowering: {e}")))?;
    let mut buffers: Vec<Vec<f32>> = operands.iter().map(|o| o.data.clone()).collect();
    let mut actual = vec![f32::NAN; out_ty.numel(n)];
    let scalars = StepScalars { n, seed, lr: 0.0 };
    interp::run_step(&step, &mut buffers, &mut actual, scalars)
        .map_err(|e| TestCaseError::fail(format!("interpreter: {e}")))?;
    compare(op.name(), &actual, &expected, tol)
}

fn compare(what: &str, actual: &[f32], expected: &[f32], tol: f32) -> Result<(), TestCaseError> {
    prop_assert_eq!(actual.len(), expected.len(), "{}: output length", what);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let ok = (a - e).abs() <= tol * (1.0 + e.abs());
        prop_assert!(ok, "{}: element {} is {}, reference {}", what, i, a, e);
    }
    Ok(())
}

/// Image sizes, channel counts and batch sizes for element-wise ops.
fn image() -> impl Strategy<Value = (usize, usize, usize, usize, u64)> {
    (1usize..4, 1usize..6, 1usize..6, 1usize..6, any::<u64>())
}

const TOL: f32 = 1e-4;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn elementwise_ops_match((n, h, w, c, seed) in image(), factor in -2.0f32..2.0) {
        let ty = TensorType::batched(&[h, w, c]);
        let x = || operand(ty.clone(), n, seed);
        let y = || operand(ty.clone(), n, seed ^ 1);
        let z = || operand(ty.clone(), n, seed ^ 2);
        check(&Op::Relu, &[x()], n, seed, 0.0)?;
        check(&Op::ReluBackward, &[x(), y()], n, seed, 0.0)?;
        check(&Op::Scale { factor }, &[x()], n, seed, 0.0)?;
        check(&Op::Mul, &[x(), y(), z()], n, seed, 0.0)?;
        check(&Op::Sum, &[x(), y()], n, seed, 0.0)?;
        check(&Op::SumBatch, &[x()], n, seed, TOL)?;
        check(&Op::GlobalAvgPool, &[x()], n, seed, TOL)?;
        let g = operand(TensorType::batched(&[c]), n, seed ^ 3);
        check(&Op::GlobalAvgPoolBackward { h, w }, &[g], n, seed, 0.0)?;
    }

    #[test]
    fn dropout_mask_matches_exactly((n, h, w, c, seed) in image(), p in 0.0f32..0.9) {
        let x = operand(TensorType::batched(&[h, w, c]), n, seed);
        check(&Op::DropoutMask { p }, &[x], n, seed, 0.0)?;
    }

    #[test]
    fn channel_copies_match(
        (n, h, w, _, seed) in image(),
        parts in prop::collection::vec(1usize..5, 1..4),
        start_frac in 0.0f64..1.0,
    ) {
        let operands: Vec<Operand> = parts
            .iter()
            .enumerate()
            .map(|(k, &c)| operand(TensorType::batched(&[h, w, c]), n, seed ^ k as u64))
            .collect();
        check(&Op::Concat, &operands, n, seed, 0.0)?;

        let total: usize = parts.iter().sum();
        let start = ((total - 1) as f64 * start_frac) as usize;
        let len = total - start;
        let x = operand(TensorType::batched(&[h, w, total]), n, seed);
        check(&Op::Slice { start, len }, &[x], n, seed, 0.0)?;
    }

    #[test]
    fn crop_and_backward_match((n, h, w, c, seed) in image(), dh in 0usize..3, dw in 0usize..3) {
        let big = operand(TensorType::batched(&[h + dh, w + dw, c]), n, seed);
        check(&Op::Crop { h, w }, &[big], n, seed, 0.0)?;
        let small = operand(TensorType::batched(&[h, w, c]), n, seed);
        check(&Op::CropBackward { h: h + dh, w: w + dw }, &[small], n, seed, 0.0)?;
    }
}

proptest! {
    #![proptest_config(config(8))]

    /// Rows per channel range from 1 to about 600, so some channels take
    /// several passes of the 256-thread block.
    #[test]
    fn batch_norm_ops_match(n in 1usize..4, h in 1usize..15, w in 1usize..15, c in 1usize..5, seed: u64) {
        let ty = TensorType::batched(&[h, w, c]);
        let stats_ty = TensorType::fixed(&[2, c]);
        let x = || operand(ty.clone(), n, seed);
        let dy = || operand(ty.clone(), n, seed ^ 7);
        let affine = || operand(stats_ty.clone(), n, seed ^ 5);
        check(&Op::BnStats, &[x()], n, seed, TOL)?;

        // Statistics of x itself, so the backward formulas see consistent inputs.
        let mut stats = vec![0.0; 2 * c];
        let xo = x();
        KernelSet::Reference
            .compute(&Op::BnStats, &[In { data: &xo.data, ty: &xo.ty }], &mut stats, &stats_ty, &Ctx { n, seed })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let st = || Operand { ty: stats_ty.clone(), data: stats.clone() };
        let eps = 1e-3;
        check(&Op::BnApply { eps }, &[x(), st(), affine()], n, seed, 1e-3)?;
        check(&Op::BnBackward { eps }, &[x(), st(), affine(), dy()], n, seed, 1e-3)?;
        check(&Op::BnAffineGrad { eps }, &[x(), st(), dy()], n, seed, 1e-3)?;
    }

    #[test]
    fn pooling_ops_match(
        n in 1usize..3, h in 1usize..8, w in 1usize..8, c in 1usize..4,
        k in 1usize..4, stride in 1usize..3, pad_frac in 0.0f64..1.0, seed: u64,
    ) {
        let pad = (k as f64 * pad_frac) as usize;
        prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k);
        let ty = TensorType::batched(&[h, w, c]);
        let x = Operand { ty: ty.clone(), data: coarse(seed, ty.numel(n)) };
        let avg = Op::AvgPool { k, stride, pad };
        let out_ty = avg.infer(&[&ty]).map_err(TestCaseError::fail)?;
        check(&avg, &[x], n, seed, TOL)?;
        let x = || Operand { ty: ty.clone(), data: coarse(seed, ty.numel(n)) };
        check(&Op::MaxPool { k, stride, pad }, &[x()], n, seed, 0.0)?;
        let dy = || operand(out_ty.clone(), n, seed ^ 9);
        check(&Op::AvgPoolBackward { k, stride, pad, in_h: h, in_w: w }, &[dy()], n, seed, TOL)?;
        check(&Op::MaxPoolBackward { k, stride, pad }, &[x(), dy()], n, seed, TOL)?;
    }

    #[test]
    fn linear_ops_match(n in 1usize..5, c in 1usize..9, k in 1usize..9, seed: u64) {
        let x = || operand(TensorType::batched(&[c]), n, seed);
        let w = || operand(TensorType::fixed(&[c, k]), n, seed ^ 1);
        let b = operand(TensorType::fixed(&[k]), n, seed ^ 2);
        let dy = || operand(TensorType::batched(&[k]), n, seed ^ 3);
        check(&Op::Linear, &[x(), w(), b], n, seed, TOL)?;
        check(&Op::LinearBackwardData, &[dy(), w()], n, seed, TOL)?;
        check(&Op::LinearBackwardWeight, &[x(), dy()], n, seed, TOL)?;
    }

    /// Classification (one label per image) and segmentation (one per pixel),
    /// with and without class weights and an ignore label.
    #[test]
    fn softmax_cross_entropy_matches(
        n in 1usize..4, pixels in 0usize..3, classes in 2usize..7,
        ignore in proptest::option::of(0u32..7), weighted: bool, weight in 0.1f32..2.0, seed: u64,
    ) {
        let spatial: Vec<usize> = if pixels == 0 { vec![] } else { vec![pixels, 2] };
        let mut logit_dims = spatial.clone();
        logit_dims.push(classes);
        let logits = || operand(TensorType::batched(&logit_dims), n, seed);
        let label_ty = TensorType::batched(&spatial);
        // Labels run over 0..=classes so that the ignore label, when it is
        // `classes`, also appears; an out-of-range label is redrawn.
        let labels: Vec<f32> = data(seed ^ 4, label_ty.numel(n))
            .into_iter()
            .map(|v| {
                let l = ((v + 1.0) / 2.0 * (classes + 1) as f32) as u32;
                if l >= classes as u32 && ignore != Some(l) { 0.0 } else { l as f32 }
            })
            .collect();
        let labels_op = || Operand { ty: label_ty.clone(), data: labels.clone() };
        let class_weights = Operand {
            ty: TensorType::fixed(&[classes]),
            data: data(seed ^ 6, classes).iter().map(|v| v.abs() + 0.1).collect(),
        };
        let operands = || {
            let mut operands = vec![logits(), labels_op()];
            if weighted {
                operands.push(class_weights.clone());
            }
            operands
        };

        let fwd = Op::SoftmaxCrossEntropy { ignore, weighted };
        check(&fwd, &operands(), n, seed, TOL)?;
        let bwd = Op::SoftmaxCrossEntropyBackward { weight, ignore, weighted };
        check(&bwd, &operands(), n, seed, TOL)?;
    }

    #[test]
    fn update_ops_match(
        len in 1usize..300, momentum in 0.0f32..0.99, weight_decay in 0.0f32..0.01,
        nesterov: bool, lr in 0.001f32..1.0, n in 1usize..9, per_item in 1usize..50, seed: u64,
    ) {
        let ty = TensorType::fixed(&[len]);
        let p = data(seed, len);
        let g = data(seed ^ 1, len);
        let v = data(seed ^ 2, len);
        let op = Op::SgdUpdate { momentum, weight_decay, nesterov };
        let step = lower::lower_step(&op, &[&ty, &ty, &ty], &ty).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let p_start = p.clone();
        let mut buffers = vec![p.clone(), g.clone(), v.clone()];
        let mut unused = Vec::new();
        interp::run_step(&step, &mut buffers, &mut unused, StepScalars { n, seed, lr })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (mut p_ref, mut v_ref) = (p, v);
        optim::sgd(&mut p_ref, &g, &mut v_ref, lr, momentum, weight_decay, nesterov);
        compare("sgd_update param", &buffers[0], &p_ref, 1e-5)?;
        compare("sgd_update velocity", &buffers[2], &v_ref, 1e-5)?;

        // A mean square is never negative; `momentum` doubles as the decay.
        let s: Vec<f32> = data(seed ^ 5, len).iter().map(|v| v * v).collect();
        let eps = 1e-6;
        let op = Op::RmsPropUpdate { decay: momentum, eps, weight_decay };
        let step = lower::lower_step(&op, &[&ty, &ty, &ty], &ty).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut buffers = vec![p_start.clone(), g.clone(), s.clone()];
        interp::run_step(&step, &mut buffers, &mut unused, StepScalars { n, seed, lr })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (mut p_ref, mut s_ref) = (p_start, s);
        optim::rmsprop(&mut p_ref, &g, &mut s_ref, lr, momentum, eps, weight_decay);
        compare("rmsprop_update param", &buffers[0], &p_ref, 1e-4)?;
        compare("rmsprop_update mean square", &buffers[2], &s_ref, 1e-5)?;

        let c = len.div_ceil(2);
        let ty = TensorType::fixed(&[2, c]);
        let running: Vec<f32> = data(seed ^ 3, 2 * c).iter().map(|v| v.abs()).collect();
        let stats: Vec<f32> = data(seed ^ 4, 2 * c).iter().map(|v| v.abs()).collect();
        let op = Op::BnRunningUpdate { momentum, per_item };
        let step = lower::lower_step(&op, &[&ty, &ty], &ty).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut buffers = vec![running.clone(), stats.clone()];
        interp::run_step(&step, &mut buffers, &mut unused, StepScalars { n, seed, lr })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expected = running;
        optim::bn_running_update(&mut expected, &stats, momentum, n * per_item);
        compare("bn_running_update", &buffers[0], &expected, 1e-6)?;
    }
}

/// A convolution geometry that fits: `(n, h, w, cin, cout, k, stride, pad)`.
fn conv_shape() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, usize, usize)> {
    (
        1usize..3,
        1usize..7,
        1usize..7,
        1usize..5,
        1usize..6,
        1usize..4,
        1usize..3,
        0usize..3,
    )
        .prop_filter(
            "the window must fit the padded image",
            |&(_, h, w, _, _, k, _, pad)| pad < k && h + 2 * pad >= k && w + 2 * pad >= k,
        )
}

proptest! {
    #![proptest_config(config(6))]

    #[test]
    fn conv2d_and_gradients_match((n, h, w, cin, cout, k, stride, pad) in conv_shape(), seed: u64) {
        let x = || operand(TensorType::batched(&[h, w, cin]), n, seed);
        let wt = || operand(TensorType::fixed(&[k, k, cin, cout]), n, seed ^ 1);
        let fwd = Op::Conv2d { k, stride, pad };
        let y_ty = fwd.infer(&[&x().ty, &wt().ty]).map_err(TestCaseError::fail)?;
        check(&fwd, &[x(), wt()], n, seed, TOL)?;

        let dy = || operand(y_ty.clone(), n, seed ^ 2);
        check(&Op::Conv2dBackwardData { k, stride, pad, in_h: h, in_w: w }, &[dy(), wt()], n, seed, TOL)?;
        check(&Op::Conv2dBackwardFilter { k, stride, pad }, &[x(), dy()], n, seed, TOL)?;
    }

    #[test]
    fn conv_transpose2d_and_gradients_match(
        (n, h, w, cin, cout, k, stride, pad) in conv_shape(), out_pad_frac in 0.0f64..1.0, seed: u64,
    ) {
        let out_pad = (stride as f64 * out_pad_frac) as usize;
        let x = || operand(TensorType::batched(&[h, w, cin]), n, seed);
        let wt = || operand(TensorType::fixed(&[k, k, cin, cout]), n, seed ^ 1);
        let fwd = Op::ConvTranspose2d { k, stride, pad, out_pad };
        let Ok(y_ty) = fwd.infer(&[&x().ty, &wt().ty]) else {
            return Ok(());
        };
        check(&fwd, &[x(), wt()], n, seed, TOL)?;

        let dy = || operand(y_ty.clone(), n, seed ^ 2);
        check(&Op::ConvTranspose2dBackwardData { k, stride, pad }, &[dy(), wt()], n, seed, TOL)?;
        check(&Op::ConvTranspose2dBackwardFilter { k, stride, pad }, &[x(), dy()], n, seed, TOL)?;
    }
}

/// M and N both past one 64 x 64 tile, and K past several 8-deep chunks.
#[test]
fn conv2d_spans_several_tiles() {
    let (n, h, w, cin, cout) = (2, 6, 7, 11, 70);
    let x = operand(TensorType::batched(&[h, w, cin]), n, 1);
    let wt = operand(TensorType::fixed(&[1, 1, cin, cout]), n, 2);
    let op = Op::Conv2d {
        k: 1,
        stride: 1,
        pad: 0,
    };
    check(&op, &[x, wt], n, 3, TOL).expect("conv over a 2 x 2 grid of tiles matches");
}

#[test]
fn validator_rejects_divergent_barrier() {
    let mut b = KernelBuilder::new("divergent_barrier", [64, 1, 1]);
    b.if_(thread_idx(Axis::X).lt(16), |b| b.barrier());
    let err = b
        .finish()
        .expect_err("a barrier under a threadIdx condition is invalid");
    let text = err.to_string();
    assert!(text.contains("`divergent_barrier`"), "{text}");
    assert!(text.contains("not block-uniform"), "{text}");
}

#[test]
fn interpreter_reports_shared_out_of_bounds() {
    let mut b = KernelBuilder::new("tile_overrun", [32, 1, 1]);
    let tile = b.shared("tile", 16);
    b.store(tile.mem(), thread_idx(Axis::X) + 4, 0.0f32);
    let kernel = b.finish().expect("the kernel is well formed");
    let err = interp::run(&kernel, &mut []).expect_err("thread 12 writes index 16");
    let text = err.to_string();
    assert!(text.contains("`tile_overrun`"), "{text}");
    assert!(text.contains("shared array `tile` index 16"), "{text}");
    assert!(text.contains("length 16"), "{text}");
}

/// Runs `op` on `operands` in the reference set at batch `n`.
fn reference_output(op: &Op, operands: &[Operand], n: usize) -> Vec<f32> {
    let types: Vec<&TensorType> = operands.iter().map(|o| &o.ty).collect();
    let out_ty = op.infer(&types).expect("the operands fit the op");
    let ins: Vec<In> = operands
        .iter()
        .map(|o| In {
            data: &o.data,
            ty: &o.ty,
        })
        .collect();
    let mut out = vec![0.0; out_ty.numel(n)];
    KernelSet::Reference
        .compute(op, &ins, &mut out, &out_ty, &Ctx { n, seed: 0 })
        .expect("the reference runs the op");
    out
}

/// The operands every fused BN-ReLU op starts with: inputs `x_1 .. x_m` of
/// `parts[i]` channels over an `h x w` image, the batch statistics of their
/// concatenation (so variances are those of real data) and random affine
/// parameters, whose negative gammas and offsets rectify some channels
/// mostly and others rarely.
fn fused_operands(parts: &[usize], (n, h, w): (usize, usize, usize), seed: u64) -> Vec<Operand> {
    let mut operands: Vec<Operand> = parts
        .iter()
        .enumerate()
        .map(|(i, &c)| operand(TensorType::batched(&[h, w, c]), n, seed ^ (i as u64 + 11)))
        .collect();
    let c: usize = parts.iter().sum();
    let concat_ty = TensorType::batched(&[h, w, c]);
    let stats_ty = TensorType::fixed(&[2, c]);
    let ctx = Ctx { n, seed };
    let ins: Vec<In> = operands
        .iter()
        .map(|o| In {
            data: &o.data,
            ty: &o.ty,
        })
        .collect();
    let mut concat = vec![0.0; concat_ty.numel(n)];
    KernelSet::Reference
        .compute(&Op::Concat, &ins, &mut concat, &concat_ty, &ctx)
        .expect("the reference concatenates the inputs");
    let mut stats = vec![0.0; 2 * c];
    KernelSet::Reference
        .compute(
            &Op::BnStats,
            &[In {
                data: &concat,
                ty: &concat_ty,
            }],
            &mut stats,
            &stats_ty,
            &ctx,
        )
        .expect("the reference computes batch statistics");
    operands.push(Operand {
        ty: stats_ty.clone(),
        data: stats,
    });
    operands.push(operand(stats_ty, n, seed ^ 5));
    operands
}

/// 1 to 3 inputs of 1 to 5 channels each, so totals are often odd.
fn fused_parts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..4)
}

/// A fused convolution: `(n, h, w, cout, k, stride, pad)` with k 1 or 3,
/// stride 1 or 2 and padding up to `k / 2`.
fn fused_conv_shape() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, usize)> {
    (
        1usize..3,
        1usize..7,
        1usize..7,
        1usize..6,
        prop_oneof![Just(1usize), Just(3)],
        1usize..3,
        0usize..2,
    )
        .prop_map(|(n, h, w, cout, k, stride, pad)| (n, h, w, cout, k, stride, pad.min(k / 2)))
        .prop_filter(
            "the window must fit the padded image",
            |&(_, h, w, _, k, _, pad)| h + 2 * pad >= k && w + 2 * pad >= k,
        )
}

/// Batch-norm arithmetic in f32 against the f64 reference, as for the
/// unfused batch-norm ops.
const FUSED_TOL: f32 = 1e-3;

proptest! {
    #![proptest_config(config(6))]

    #[test]
    fn fused_conv_and_filter_gradient_match(
        parts in fused_parts(), (n, h, w, cout, k, stride, pad) in fused_conv_shape(), seed: u64,
    ) {
        let c: usize = parts.iter().sum();
        let eps = 1e-3;
        let fwd = Op::BnReluConv { k, stride, pad, eps };
        let mut operands = fused_operands(&parts, (n, h, w), seed);
        operands.push(operand(TensorType::fixed(&[k, k, c, cout]), n, seed ^ 1));
        let types: Vec<&TensorType> = operands.iter().map(|o| &o.ty).collect();
        let y_ty = fwd.infer(&types).map_err(TestCaseError::fail)?;
        check(&fwd, &operands, n, seed, FUSED_TOL)?;

        let bwd = Op::BnReluConvBackwardFilter { k, stride, pad, eps };
        let mut operands = fused_operands(&parts, (n, h, w), seed);
        operands.push(operand(y_ty, n, seed ^ 2));
        check(&bwd, &operands, n, seed, FUSED_TOL)?;
    }

    /// Rows per channel range from 1 to about 400, so some channels take
    /// several passes of the 256-thread block.
    #[test]
    fn fused_bn_relu_gradients_match(
        parts in fused_parts(), n in 1usize..4, h in 1usize..12, w in 1usize..12, seed: u64,
    ) {
        let c: usize = parts.iter().sum();
        let eps = 1e-3;
        let dz = || operand(TensorType::batched(&[h, w, c]), n, seed ^ 7);
        let mut operands = fused_operands(&parts, (n, h, w), seed);
        operands.push(dz());
        check(&Op::BnReluBackward { eps }, &operands, n, seed, FUSED_TOL)?;
        let mut operands = fused_operands(&parts, (n, h, w), seed);
        operands.push(dz());
        check(&Op::BnReluAffineGrad { eps }, &operands, n, seed, FUSED_TOL)?;

        // Every run of consecutive inputs, reading its columns of the
        // statistics, affine parameters, affine gradient and dz of the whole
        // concatenation.
        let m = parts.len();
        let mut all = fused_operands(&parts, (n, h, w), seed);
        all.push(dz());
        let daffine = Operand {
            ty: TensorType::fixed(&[2, c]),
            data: reference_output(&Op::BnReluAffineGrad { eps }, &all, n),
        };
        for first in 0..m {
            for end in first + 1..=m {
                let start = parts[..first].iter().sum();
                let mut operands = all[first..end].to_vec();
                operands.extend_from_slice(&all[m..m + 2]);
                operands.push(daffine.clone());
                operands.push(dz());
                let op = Op::BnReluBackwardPart { eps, start };
                check(&op, &operands, n, seed, FUSED_TOL)?;
            }
        }
    }

    #[test]
    fn concat_stats_matches(parts in fused_parts(), seed: u64) {
        let operands: Vec<Operand> = parts
            .iter()
            .enumerate()
            .map(|(i, &c)| operand(TensorType::fixed(&[2, c]), 1, seed ^ i as u64))
            .collect();
        check(&Op::ConcatStats, &operands, 1, seed, 0.0)?;
    }
}

/// Fused ops past one GEMM tile: M = 84 pixels and N = 70 output channels
/// for the convolution, M = 67 input channels for the filter gradient, and
/// K past several 8-deep chunks, with the channels of one chunk spread over
/// two inputs.
#[test]
fn fused_conv_spans_several_tiles() {
    let (n, h, w, cout, eps) = (2, 6, 7, 70, 1e-3);
    let forward = Op::BnReluConv {
        k: 1,
        stride: 1,
        pad: 0,
        eps,
    };
    let parts = [5, 7, 9];
    let mut operands = fused_operands(&parts, (n, h, w), 3);
    operands.push(operand(TensorType::fixed(&[1, 1, 21, cout]), n, 4));
    check(&forward, &operands, n, 3, FUSED_TOL).expect("fused conv over 2 x 2 tiles matches");

    let filter = Op::BnReluConvBackwardFilter {
        k: 3,
        stride: 2,
        pad: 1,
        eps,
    };
    let parts = [30, 37];
    let mut operands = fused_operands(&parts, (n, h, w), 5);
    operands.push(operand(TensorType::batched(&[3, 4, 3]), n, 6));
    check(&filter, &operands, n, 5, FUSED_TOL).expect("fused filter gradient over 2 tiles matches");
}

/// `[2, c]` running statistics: means in `[-1, 1)`, variances in `[0.5, 1.5)`.
fn running_operand(c: usize, seed: u64) -> Operand {
    let mut stats = operand(TensorType::fixed(&[2, c]), 1, seed);
    stats.data[c..].iter_mut().for_each(|v| *v = 1.0 + *v / 2.0);
    stats
}

proptest! {
    #![proptest_config(config(6))]

    /// The batch-norm fold: the folded weight and bias, and both convs with
    /// the bias epilogue, with and without the ReLU.
    #[test]
    fn folded_conv_ops_match(
        parts in fused_parts(), (n, h, w, cout, k, stride, pad) in fused_conv_shape(), relu: bool,
        seed: u64,
    ) {
        let c: usize = parts.iter().sum();
        let eps = 1e-3;
        let weight = || operand(TensorType::fixed(&[k, k, c, cout]), n, seed ^ 1);
        let running = || running_operand(cout, seed ^ 8);
        let affine = || operand(TensorType::fixed(&[2, cout]), n, seed ^ 9);
        let bias = || operand(TensorType::fixed(&[cout]), n, seed ^ 10);
        check(&Op::BnFoldWeight { eps }, &[weight(), running(), affine()], n, seed, TOL)?;
        check(&Op::BnFoldBias { eps }, &[running(), affine()], n, seed, TOL)?;

        let x = operand(TensorType::batched(&[h, w, c]), n, seed ^ 2);
        let conv = Op::Conv2dBias { k, stride, pad, relu };
        check(&conv, &[x, weight(), bias()], n, seed, TOL)?;

        let fused = Op::BnReluConvBias { k, stride, pad, eps, relu };
        let mut operands = fused_operands(&parts, (n, h, w), seed);
        operands.extend([weight(), bias()]);
        check(&fused, &operands, n, seed, FUSED_TOL)?;
    }
}

proptest! {
    #![proptest_config(config(6))]

    #[test]
    fn fused_bn_relu_pools_match(
        parts in fused_parts(), n in 1usize..4, h in 1usize..9, w in 1usize..9, seed: u64,
    ) {
        let operands = fused_operands(&parts, (n, h, w), seed);
        check(&Op::BnReluGlobalAvgPool { eps: 1e-3 }, &operands, n, seed, FUSED_TOL)?;
        for (k, stride, pad) in [(2, 2, 0), (3, 2, 1)] {
            if h + 2 * pad < k || w + 2 * pad < k {
                continue;
            }
            let operands = fused_operands(&parts, (n, h, w), seed);
            let op = Op::BnReluAvgPool { k, stride, pad, eps: 1e-3 };
            check(&op, &operands, n, seed, FUSED_TOL)?;
        }
    }
}
