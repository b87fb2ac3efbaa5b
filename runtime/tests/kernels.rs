//! Checks of the CPU kernels through `KernelSet::compute`: property tests that
//! the fast set matches the reference set on random small shapes, and
//! finite-difference checks of every backward kernel of the reference set
//! against the forward kernel it differentiates.
//!
//! Finite differences use the scalar objective `sum(out * upstream)`, summed
//! in f64, with central differences of step `STEP`. The reference kernels
//! accumulate in f64 and round each output once, so the difference quotient
//! carries an error of about `1e-7 * |out| / STEP` per output element.

use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::{Ctx, In, KernelError, KernelSet};
use proptest::prelude::*;

const STEP: f64 = 1e-2;

/// Deterministic values in `[-1, 1)` from SplitMix64, so that a failing case
/// is reproduced by its seed.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Distinct values spaced by 0.05, in random order, so that max pooling and
/// ReLU have no ties or kinks within a finite-difference step.
fn distinct(seed: u64, len: usize) -> Vec<f32> {
    let keys = values(seed, len);
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let mut out = vec![0.0; len];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = (rank as f32 - len as f32 / 2.0) * 0.05 + 0.025;
    }
    out
}

/// Runs `op` on `inputs` at batch size `n` and returns its output.
fn run(
    set: KernelSet,
    op: &Op,
    inputs: &[(&[f32], &TensorType)],
    n: usize,
) -> Result<Vec<f32>, KernelError> {
    let types: Vec<&TensorType> = inputs.iter().map(|x| x.1).collect();
    let out_ty = op.infer(&types).map_err(|message| KernelError::Invalid {
        op: op.name(),
        message,
    })?;
    let operands: Vec<In> = inputs.iter().map(|&(data, ty)| In { data, ty }).collect();
    let mut out = vec![f32::NAN; out_ty.numel(n)];
    set.compute(op, &operands, &mut out, &out_ty, &Ctx { n, seed: 17 })?;
    Ok(out)
}

fn reference(op: &Op, inputs: &[(&[f32], &TensorType)], n: usize) -> Vec<f32> {
    run(KernelSet::Reference, op, inputs, n).expect("reference kernel runs")
}

/// Asserts `|fast - reference| <= tol * max(1, max |reference|)` everywhere.
fn assert_close(fast: &[f32], reference: &[f32], tol: f32, what: &str) {
    assert_eq!(fast.len(), reference.len(), "{what}: lengths differ");
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in fast.iter().zip(reference).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}: element {i} is {a} in the fast set and {b} in the reference set"
        );
    }
}

/// Runs `op` in both sets and compares the outputs.
fn check_sets(op: &Op, inputs: &[(&[f32], &TensorType)], n: usize) {
    let fast = run(KernelSet::Fast, op, inputs, n).expect("fast kernel runs");
    assert_close(&fast, &reference(op, inputs, n), 1e-4, op.name());
}

fn img(h: usize, w: usize, c: usize) -> TensorType {
    TensorType::batched(&[h, w, c])
}

fn fits(size: usize, k: usize, pad: usize) -> bool {
    size + 2 * pad >= k
}

fn out_size(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - k) / stride + 1
}

/// Spatial parameters: batch, height, width, kernel, stride, padding.
fn window_params() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize)> {
    (
        1usize..3,
        1usize..10,
        1usize..10,
        prop::sample::select(vec![1usize, 2, 3, 7]),
        1usize..3,
        0usize..2,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn conv_ops_match((n, h, w, k, stride, pad) in window_params(), cin in 1usize..6, cout in 1usize..6, seed in any::<u64>()) {
        prop_assume!(fits(h, k, pad) && fits(w, k, pad));
        let (ho, wo) = (out_size(h, k, stride, pad), out_size(w, k, stride, pad));
        let (xt, yt, wt) = (img(h, w, cin), img(ho, wo, cout), TensorType::fixed(&[k, k, cin, cout]));
        let x = values(seed, xt.numel(n));
        let wv = values(seed + 1, wt.numel(1));
        let dy = values(seed + 2, yt.numel(n));

        check_sets(&Op::Conv2d { k, stride, pad }, &[(&x, &xt), (&wv, &wt)], n);
        let data = Op::Conv2dBackwardData { k, stride, pad, in_h: h, in_w: w };
        check_sets(&data, &[(&dy, &yt), (&wv, &wt)], n);
        check_sets(&Op::Conv2dBackwardFilter { k, stride, pad }, &[(&x, &xt), (&dy, &yt)], n);
    }

    #[test]
    fn conv_transpose_ops_match((n, h, w, k, stride, pad) in window_params(), out_pad in 0usize..2, cin in 1usize..6, cout in 1usize..6, seed in any::<u64>()) {
        let out_pad = out_pad.min(stride - 1);
        let grow = |s: usize| ((s - 1) * stride + k + out_pad).checked_sub(2 * pad).filter(|&v| v > 0);
        let (Some(ho), Some(wo)) = (grow(h), grow(w)) else {
            return Err(TestCaseError::reject("padding larger than the output"));
        };
        let (xt, yt, wt) = (img(h, w, cin), img(ho, wo, cout), TensorType::fixed(&[k, k, cin, cout]));
        let x = values(seed, xt.numel(n));
        let wv = values(seed + 1, wt.numel(1));
        let dy = values(seed + 2, yt.numel(n));

        check_sets(&Op::ConvTranspose2d { k, stride, pad, out_pad }, &[(&x, &xt), (&wv, &wt)], n);
        check_sets(&Op::ConvTranspose2dBackwardData { k, stride, pad }, &[(&dy, &yt), (&wv, &wt)], n);
        check_sets(&Op::ConvTranspose2dBackwardFilter { k, stride, pad }, &[(&x, &xt), (&dy, &yt)], n);
    }

    #[test]
    fn pool_ops_match((n, h, w, k, stride, pad) in window_params(), c in 1usize..6, seed in any::<u64>()) {
        prop_assume!(pad < k && fits(h, k, pad) && fits(w, k, pad));
        let (ho, wo) = (out_size(h, k, stride, pad), out_size(w, k, stride, pad));
        let (xt, yt) = (img(h, w, c), img(ho, wo, c));
        let x = values(seed, xt.numel(n));
        let dy = values(seed + 1, yt.numel(n));

        check_sets(&Op::AvgPool { k, stride, pad }, &[(&x, &xt)], n);
        check_sets(&Op::MaxPool { k, stride, pad }, &[(&x, &xt)], n);
        let avg_back = Op::AvgPoolBackward { k, stride, pad, in_h: h, in_w: w };
        check_sets(&avg_back, &[(&dy, &yt)], n);
        check_sets(&Op::MaxPoolBackward { k, stride, pad }, &[(&x, &xt), (&dy, &yt)], n);
        // Four levels give many ties, as after a ReLU; both sets must route
        // each gradient to the same (first) maximum.
        let tied: Vec<f32> = x.iter().map(|v| (v * 2.0).round() / 2.0).collect();
        check_sets(&Op::MaxPoolBackward { k, stride, pad }, &[(&tied, &xt), (&dy, &yt)], n);
        check_sets(&Op::GlobalAvgPool, &[(&x, &xt)], n);
        let gt = TensorType::batched(&[c]);
        check_sets(&Op::GlobalAvgPoolBackward { h, w }, &[(&dy[..n * c], &gt)], n);
    }

    #[test]
    fn batch_norm_ops_match(n in 1usize..4, h in 1usize..12, w in 1usize..12, c in 1usize..9, seed in any::<u64>()) {
        let (xt, st) = (img(h, w, c), TensorType::fixed(&[2, c]));
        let x: Vec<f32> = values(seed, xt.numel(n)).iter().map(|v| 3.0 * v + 1.0).collect();
        let dy = values(seed + 1, xt.numel(n));
        let affine = values(seed + 2, 2 * c);
        let stats = reference(&Op::BnStats, &[(&x, &xt)], n);

        check_sets(&Op::BnStats, &[(&x, &xt)], n);
        let eps = 1e-5;
        check_sets(&Op::BnApply { eps }, &[(&x, &xt), (&stats, &st), (&affine, &st)], n);
        check_sets(&Op::BnBackward { eps }, &[(&x, &xt), (&stats, &st), (&affine, &st), (&dy, &xt)], n);
        check_sets(&Op::BnAffineGrad { eps }, &[(&x, &xt), (&stats, &st), (&dy, &xt)], n);
    }

    #[test]
    fn dense_and_loss_ops_match(n in 1usize..40, c in 1usize..20, k in 1usize..12, ignore in prop::option::of(0u32..12), weighted in any::<bool>(), seed in any::<u64>()) {
        let (xt, wt, bt, yt) = (TensorType::batched(&[c]), TensorType::fixed(&[c, k]), TensorType::fixed(&[k]), TensorType::batched(&[k]));
        let x = values(seed, n * c);
        let wv = values(seed + 1, c * k);
        let b = values(seed + 2, k);
        let dy = values(seed + 3, n * k);

        check_sets(&Op::Linear, &[(&x, &xt), (&wv, &wt), (&b, &bt)], n);
        check_sets(&Op::LinearBackwardData, &[(&dy, &yt), (&wv, &wt)], n);
        check_sets(&Op::LinearBackwardWeight, &[(&x, &xt), (&dy, &yt)], n);
        check_sets(&Op::SumBatch, &[(&dy, &yt)], n);

        // Segmentation-shaped logits [n, 2, 3, k] with labels [n, 2, 3].
        let (lt, labt) = (img(2, 3, k), TensorType::batched(&[2, 3]));
        let logits: Vec<f32> = values(seed + 4, lt.numel(n)).iter().map(|v| 8.0 * v).collect();
        let labels: Vec<f32> = values(seed + 5, labt.numel(n)).iter().map(|v| ((v + 1.0) / 2.0 * k as f32).floor().min(k as f32 - 1.0)).collect();
        let class_weights: Vec<f32> = values(seed + 6, k).iter().map(|v| v + 1.5).collect();
        let wt = TensorType::fixed(&[k]);
        let ignore = ignore.filter(|&i| (i as usize) < k);
        let mut operands = vec![(&logits[..], &lt), (&labels[..], &labt)];
        if weighted {
            operands.push((&class_weights[..], &wt));
        }
        check_sets(&Op::SoftmaxCrossEntropy { ignore, weighted }, &operands, n);
        let back = Op::SoftmaxCrossEntropyBackward { weight: 0.5, ignore, weighted };
        check_sets(&back, &operands, n);
    }

    #[test]
    fn elementwise_ops_match(n in 1usize..4, h in 1usize..20, w in 1usize..20, c in 1usize..9, c2 in 1usize..5, seed in any::<u64>()) {
        let (xt, x2t) = (img(h, w, c), img(h, w, c2));
        let x = values(seed, xt.numel(n));
        let y = values(seed + 1, xt.numel(n));
        let z = values(seed + 2, x2t.numel(n));

        check_sets(&Op::Relu, &[(&x, &xt)], n);
        check_sets(&Op::ReluBackward, &[(&x, &xt), (&y, &xt)], n);
        check_sets(&Op::Mul, &[(&x, &xt), (&y, &xt), (&x, &xt)], n);
        check_sets(&Op::Sum, &[(&x, &xt), (&y, &xt), (&x, &xt)], n);
        check_sets(&Op::Scale { factor: -0.75 }, &[(&x, &xt)], n);
        check_sets(&Op::DropoutMask { p: 0.3 }, &[(&x, &xt)], n);
        check_sets(&Op::Concat, &[(&x, &xt), (&z, &x2t), (&y, &xt)], n);
        check_sets(&Op::Slice { start: c / 2, len: c - c / 2 }, &[(&x, &xt)], n);
        let (ch, cw) = (h.div_ceil(2), w - w / 3);
        check_sets(&Op::Crop { h: ch, w: cw }, &[(&x, &xt)], n);
        let small = img(ch, cw, c);
        check_sets(&Op::CropBackward { h, w }, &[(&x[..small.numel(n)], &small)], n);
    }
}

/// Checks convolutions whose small side spans several 256-pixel blocks of the
/// fast kernels, with blocks that start and end inside images.
#[test]
fn conv_ops_match_over_many_blocks() {
    let (n, h, w, cin, cout) = (3, 15, 13, 5, 4);
    for (seed, (k, stride, pad)) in [
        (3, 1, 1),
        (1, 1, 0),
        (3, 2, 1),
        (3, 1, 0),
        (7, 2, 3),
        (2, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let (ho, wo) = (out_size(h, k, stride, pad), out_size(w, k, stride, pad));
        let (xt, yt, wt) = (
            img(h, w, cin),
            img(ho, wo, cout),
            TensorType::fixed(&[k, k, cin, cout]),
        );
        let seed = 10 * seed as u64;
        let x = values(seed, xt.numel(n));
        let wv = values(seed + 1, wt.numel(1));
        let dy = values(seed + 2, yt.numel(n));
        check_sets(&Op::Conv2d { k, stride, pad }, &[(&x, &xt), (&wv, &wt)], n);
        let data = Op::Conv2dBackwardData {
            k,
            stride,
            pad,
            in_h: h,
            in_w: w,
        };
        check_sets(&data, &[(&dy, &yt), (&wv, &wt)], n);
        check_sets(
            &Op::Conv2dBackwardFilter { k, stride, pad },
            &[(&x, &xt), (&dy, &yt)],
            n,
        );
    }
}

#[test]
fn dropout_mask_same_on_any_thread_count() {
    let ty = img(33, 31, 17);
    let x = vec![0.0; ty.numel(3)];
    let op = Op::DropoutMask { p: 0.5 };
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        pool.install(|| run(KernelSet::Fast, &op, &[(&x, &ty)], 3).expect("dropout runs"))
    };
    let one = on(1);
    assert_eq!(one, on(2));
    assert_eq!(one, on(3));
    assert_eq!(one, reference(&op, &[(&x, &ty)], 3));
}

#[test]
fn wrong_operand_length_is_invalid() {
    let ty = img(2, 2, 3);
    let short = vec![0.0; 11];
    for set in [KernelSet::Reference, KernelSet::Fast] {
        let err = run(set, &Op::Relu, &[(&short, &ty)], 1).expect_err("11 elements for 12");
        assert!(matches!(err, KernelError::Invalid { .. }), "{err}");
        assert!(
            err.to_string().contains("has 11 elements, expected 12"),
            "{err}"
        );
    }
}

#[test]
fn leaf_op_is_unsupported() {
    let ty = img(1, 1, 1);
    let out_ty = ty.clone();
    let mut out = [0.0];
    let err = KernelSet::Fast
        .compute(&Op::Image, &[], &mut out, &out_ty, &Ctx { n: 1, seed: 0 })
        .expect_err("leaves have no kernel");
    assert!(matches!(err, KernelError::Unsupported { .. }), "{err}");
}

// ---- finite-difference gradient checks of the reference set

/// `sum(out * upstream)` in f64.
fn objective(out: &[f32], upstream: &[f32]) -> f64 {
    out.iter()
        .zip(upstream)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

/// Central differences of `f` with respect to every element of `x`.
fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + STEP as f32;
            let up = f(&probe);
            probe[i] = x[i] - STEP as f32;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * STEP)
        })
        .collect()
}

/// Asserts that an analytic gradient matches the finite differences.
fn assert_grad(analytic: &[f32], numeric: &[f64], what: &str) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths differ");
    for (i, (a, d)) in analytic.iter().zip(numeric).enumerate() {
        let tol = 2e-3 + 1e-2 * d.abs();
        assert!(
            (*a as f64 - d).abs() <= tol,
            "{what}: element {i} is {a} but finite differences give {d}"
        );
    }
}

/// Checks the data and filter gradients of a (transposed) convolution.
fn check_conv_grads(
    forward: Op,
    data: Op,
    filter: Op,
    x_ty: TensorType,
    w_ty: TensorType,
    n: usize,
) {
    let x = values(1, x_ty.numel(n));
    let w = values(2, w_ty.numel(1));
    let y_ty = forward.infer(&[&x_ty, &w_ty]).expect("forward shapes fit");
    let u = values(3, y_ty.numel(n));

    let dx = reference(&data, &[(&u, &y_ty), (&w, &w_ty)], n);
    let fd_x = numeric_grad(&x, |x| {
        objective(&reference(&forward, &[(x, &x_ty), (&w, &w_ty)], n), &u)
    });
    assert_grad(&dx, &fd_x, data.name());

    let dw = reference(&filter, &[(&x, &x_ty), (&u, &y_ty)], n);
    let fd_w = numeric_grad(&w, |w| {
        objective(&reference(&forward, &[(&x, &x_ty), (w, &w_ty)], n), &u)
    });
    assert_grad(&dw, &fd_w, filter.name());
}

#[test]
fn conv2d_gradients() {
    for (k, stride, pad, h, w) in [
        (3, 1, 1, 5, 4),
        (3, 2, 1, 5, 6),
        (2, 2, 0, 4, 5),
        (1, 1, 0, 3, 3),
        (1, 2, 0, 5, 4),
        (7, 2, 1, 7, 6),
    ] {
        let (cin, cout) = (3, 2);
        check_conv_grads(
            Op::Conv2d { k, stride, pad },
            Op::Conv2dBackwardData {
                k,
                stride,
                pad,
                in_h: h,
                in_w: w,
            },
            Op::Conv2dBackwardFilter { k, stride, pad },
            img(h, w, cin),
            TensorType::fixed(&[k, k, cin, cout]),
            2,
        );
    }
}

#[test]
fn conv_transpose2d_gradients() {
    for (k, stride, pad, out_pad, h, w) in [
        (3, 2, 1, 1, 3, 2),
        (2, 2, 0, 0, 2, 3),
        (3, 1, 1, 0, 3, 3),
        (3, 2, 0, 1, 2, 2),
    ] {
        let (cin, cout) = (2, 3);
        check_conv_grads(
            Op::ConvTranspose2d {
                k,
                stride,
                pad,
                out_pad,
            },
            Op::ConvTranspose2dBackwardData { k, stride, pad },
            Op::ConvTranspose2dBackwardFilter { k, stride, pad },
            img(h, w, cin),
            TensorType::fixed(&[k, k, cin, cout]),
            2,
        );
    }
}

#[test]
fn batch_norm_gradients() {
    let (n, c, eps) = (2, 3, 1e-5);
    let (xt, st) = (img(3, 2, c), TensorType::fixed(&[2, c]));
    let x = values(4, xt.numel(n));
    let affine: Vec<f32> = values(5, 2 * c).iter().map(|v| v + 1.5).collect();
    let u = values(6, xt.numel(n));
    // The objective recomputes the batch statistics, so dx includes their dependence on x.
    let forward = |x: &[f32], affine: &[f32]| {
        let stats = reference(&Op::BnStats, &[(x, &xt)], n);
        objective(
            &reference(
                &Op::BnApply { eps },
                &[(x, &xt), (&stats, &st), (affine, &st)],
                n,
            ),
            &u,
        )
    };
    let stats = reference(&Op::BnStats, &[(&x, &xt)], n);

    let dx = reference(
        &Op::BnBackward { eps },
        &[(&x, &xt), (&stats, &st), (&affine, &st), (&u, &xt)],
        n,
    );
    assert_grad(
        &dx,
        &numeric_grad(&x, |x| forward(x, &affine)),
        "bn_backward",
    );
    let da = reference(
        &Op::BnAffineGrad { eps },
        &[(&x, &xt), (&stats, &st), (&u, &xt)],
        n,
    );
    assert_grad(
        &da,
        &numeric_grad(&affine, |a| forward(&x, a)),
        "bn_affine_grad",
    );
}

/// Checks a one-operand op whose gradient kernel reads only `dy`.
fn check_unary_grad(forward: &Op, backward: &Op, x_ty: &TensorType, x: &[f32], n: usize) {
    let y_ty = forward.infer(&[x_ty]).expect("forward shapes fit");
    let u = values(7, y_ty.numel(n));
    let dx = reference(backward, &[(&u, &y_ty)], n);
    let fd = numeric_grad(x, |x| objective(&reference(forward, &[(x, x_ty)], n), &u));
    assert_grad(&dx, &fd, backward.name());
}

#[test]
fn pool_gradients() {
    let n = 2;
    for (k, stride, pad, h, w) in [
        (3, 2, 1, 5, 4),
        (2, 2, 0, 4, 4),
        (3, 1, 1, 3, 4),
        (2, 1, 0, 3, 2),
    ] {
        let xt = img(h, w, 2);
        let x = distinct(8, xt.numel(n));
        let avg_back = Op::AvgPoolBackward {
            k,
            stride,
            pad,
            in_h: h,
            in_w: w,
        };
        check_unary_grad(&Op::AvgPool { k, stride, pad }, &avg_back, &xt, &x, n);

        let max = Op::MaxPool { k, stride, pad };
        let yt = max.infer(&[&xt]).expect("pool fits");
        let u = values(9, yt.numel(n));
        let dx = reference(
            &Op::MaxPoolBackward { k, stride, pad },
            &[(&x, &xt), (&u, &yt)],
            n,
        );
        let fd = numeric_grad(&x, |x| objective(&reference(&max, &[(x, &xt)], n), &u));
        assert_grad(&dx, &fd, "max_pool_backward");
    }
    let xt = img(3, 4, 2);
    check_unary_grad(
        &Op::GlobalAvgPool,
        &Op::GlobalAvgPoolBackward { h: 3, w: 4 },
        &xt,
        &values(10, xt.numel(n)),
        n,
    );
}

#[test]
fn crop_gradient() {
    let xt = img(5, 4, 2);
    check_unary_grad(
        &Op::Crop { h: 3, w: 4 },
        &Op::CropBackward { h: 5, w: 4 },
        &xt,
        &values(11, xt.numel(2)),
        2,
    );
}

#[test]
fn relu_gradient() {
    let (n, xt) = (2, img(3, 3, 2));
    let x = distinct(12, xt.numel(n));
    let u = values(13, xt.numel(n));
    let dx = reference(&Op::ReluBackward, &[(&x, &xt), (&u, &xt)], n);
    let fd = numeric_grad(&x, |x| objective(&reference(&Op::Relu, &[(x, &xt)], n), &u));
    assert_grad(&dx, &fd, "relu_backward");
}

#[test]
fn concat_gradient_is_slice() {
    let n = 2;
    let (at, bt) = (img(2, 3, 2), img(2, 3, 3));
    let (a, b) = (values(14, at.numel(n)), values(15, bt.numel(n)));
    let yt = img(2, 3, 5);
    let u = values(16, yt.numel(n));
    let da = reference(&Op::Slice { start: 0, len: 2 }, &[(&u, &yt)], n);
    let db = reference(&Op::Slice { start: 2, len: 3 }, &[(&u, &yt)], n);
    let fd_a = numeric_grad(&a, |a| {
        objective(&reference(&Op::Concat, &[(a, &at), (&b, &bt)], n), &u)
    });
    let fd_b = numeric_grad(&b, |b| {
        objective(&reference(&Op::Concat, &[(&a, &at), (b, &bt)], n), &u)
    });
    assert_grad(&da, &fd_a, "slice of operand 0");
    assert_grad(&db, &fd_b, "slice of operand 1");
}

#[test]
fn linear_gradients() {
    let (n, c, k) = (3, 4, 5);
    let (xt, wt, bt, yt) = (
        TensorType::batched(&[c]),
        TensorType::fixed(&[c, k]),
        TensorType::fixed(&[k]),
        TensorType::batched(&[k]),
    );
    let (x, w, b) = (values(17, n * c), values(18, c * k), values(19, k));
    let u = values(20, n * k);
    let forward = |x: &[f32], w: &[f32], b: &[f32]| {
        objective(
            &reference(&Op::Linear, &[(x, &xt), (w, &wt), (b, &bt)], n),
            &u,
        )
    };

    let dx = reference(&Op::LinearBackwardData, &[(&u, &yt), (&w, &wt)], n);
    assert_grad(
        &dx,
        &numeric_grad(&x, |x| forward(x, &w, &b)),
        "linear_backward_data",
    );
    let dw = reference(&Op::LinearBackwardWeight, &[(&x, &xt), (&u, &yt)], n);
    assert_grad(
        &dw,
        &numeric_grad(&w, |w| forward(&x, w, &b)),
        "linear_backward_weight",
    );
    let db = reference(&Op::SumBatch, &[(&u, &yt)], n);
    assert_grad(&db, &numeric_grad(&b, |b| forward(&x, &w, b)), "sum_batch");
}

#[test]
fn softmax_cross_entropy_gradient() {
    let n = 2;
    let (lt, labt) = (img(2, 2, 4), TensorType::batched(&[2, 2]));
    let logits: Vec<f32> = values(21, lt.numel(n)).iter().map(|v| 3.0 * v).collect();
    // Label 4 is the ignore label; positions 2 and 5 carry it.
    let labels = [0.0, 3.0, 4.0, 1.0, 2.0, 4.0, 3.0, 3.0];
    let class_weights = [0.5, 2.0, 1.0, 3.0];
    let wt = TensorType::fixed(&[4]);
    for weighted in [false, true] {
        let loss = Op::SoftmaxCrossEntropy {
            ignore: Some(4),
            weighted,
        };
        let weight = 0.7;
        let back = Op::SoftmaxCrossEntropyBackward {
            weight,
            ignore: Some(4),
            weighted,
        };
        let run_on = |op: &Op, z: &[f32]| {
            let mut operands = vec![(z, &lt), (&labels[..], &labt)];
            if weighted {
                operands.push((&class_weights[..], &wt));
            }
            reference(op, &operands, n)
        };
        let grad = run_on(&back, &logits);
        let fd = numeric_grad(&logits, |z| weight as f64 * run_on(&loss, z)[0] as f64);
        assert_grad(&grad, &fd, "softmax_cross_entropy_backward");
    }
}

/// Times a 3x3 conv at N=64, 32x32, 48 -> 12 channels in both sets. Run with
/// `cargo test --release -p ldnc-runtime --test kernels -- --ignored --nocapture`.
#[test]
#[ignore = "a one-off throughput measurement, not a check"]
fn conv2d_throughput() {
    let (n, xt, wt) = (64, img(32, 32, 48), TensorType::fixed(&[3, 3, 48, 12]));
    let op = Op::Conv2d {
        k: 3,
        stride: 1,
        pad: 1,
    };
    let x = values(22, xt.numel(n));
    let w = values(23, wt.numel(1));
    let time = |set: KernelSet, reps: u32| {
        run(set, &op, &[(&x, &xt), (&w, &wt)], n).expect("conv runs");
        let start = std::time::Instant::now();
        for _ in 0..reps {
            run(set, &op, &[(&x, &xt), (&w, &wt)], n).expect("conv runs");
        }
        start.elapsed().as_secs_f64() / reps as f64
    };
    let fast = time(KernelSet::Fast, 10);
    let reference = time(KernelSet::Reference, 1);
    let gmacs = (n * 32 * 32 * 12 * 9 * 48) as f64 / 1e9;
    println!(
        "conv2d 3x3 N=64 32x32 48->12 on {} threads: fast {:.2} ms ({:.1} GMAC/s), reference {:.0} ms ({:.2} GMAC/s)",
        rayon::current_num_threads(),
        fast * 1e3,
        gmacs / fast,
        reference * 1e3,
        gmacs / reference
    );
}
