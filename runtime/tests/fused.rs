//! Checks of the fused BN-ReLU kernels through `KernelSet::compute`. The fast
//! set must match the reference set, and every fused op in either set must
//! match the unfused reference ops it replaces. The three backward kernels of
//! `BnReluConv` must match central differences of its reference forward.
//!
//! The layers are random and small: 1-4 inputs of 1-7 channels, 1x1 and 3x3
//! windows, stride 1 and 2, padding 0 and 1, batch 1-4, sizes 1-7. Beta is
//! chosen per channel so that the ReLU kink sits in the widest gap between the
//! values `gamma * xhat`. Every batch-norm output is then far from 0, so the
//! f32 rounding of the fast set cannot flip the ReLU mask, and both signs
//! occur wherever a channel has two distinct values.

use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::{Ctx, In, KernelError, KernelSet};
use proptest::prelude::*;
use std::ops::Range;

const EPS: f32 = 1e-5;

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

/// Operand values with their types.
type Operand<'a> = (&'a [f32], &'a TensorType);

/// Runs `op` on `inputs` at batch size `n` and returns its output.
fn run(set: KernelSet, op: &Op, inputs: &[Operand], n: usize) -> Result<Vec<f32>, KernelError> {
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

/// Runs `op` in the reference set, which must accept the operands.
fn reference(op: &Op, inputs: &[Operand], n: usize) -> Vec<f32> {
    run(KernelSet::Reference, op, inputs, n).expect("reference kernel runs")
}

/// Asserts `|got - want| <= tol * max(1, max |want|)` everywhere.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}: element {i} is {a}, expected {b}"
        );
    }
}

/// The geometry of one fused layer `conv(relu(bn(concat(x_1 .. x_m))))`.
#[derive(Debug, Clone)]
struct Layer {
    n: usize,
    h: usize,
    w: usize,
    channels: Vec<usize>,
    k: usize,
    stride: usize,
    pad: usize,
    cout: usize,
}

impl Layer {
    fn width(&self) -> usize {
        self.channels.iter().sum()
    }

    fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    fn input_types(&self) -> Vec<TensorType> {
        let image = |c: &usize| TensorType::batched(&[self.h, self.w, *c]);
        self.channels.iter().map(image).collect()
    }

    fn concat_type(&self) -> TensorType {
        TensorType::batched(&[self.h, self.w, self.width()])
    }

    fn rows_type(&self) -> TensorType {
        TensorType::fixed(&[2, self.width()])
    }

    fn weight_type(&self) -> TensorType {
        TensorType::fixed(&[self.k, self.k, self.width(), self.cout])
    }

    fn out_type(&self) -> TensorType {
        let size = |s: usize| (s + 2 * self.pad - self.k) / self.stride + 1;
        TensorType::batched(&[size(self.h), size(self.w), self.cout])
    }

    fn conv(&self) -> Op {
        Op::Conv2d {
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        }
    }

    fn bn_relu_conv(&self) -> Op {
        Op::BnReluConv {
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            eps: EPS,
        }
    }

    fn bn_relu_conv_backward_filter(&self) -> Op {
        Op::BnReluConvBackwardFilter {
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            eps: EPS,
        }
    }

    fn conv_backward_data(&self) -> Op {
        Op::Conv2dBackwardData {
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            in_h: self.h,
            in_w: self.w,
        }
    }
}

/// Layers with up to `n` images, `size x size` pixels, `inputs` inputs of up
/// to `c` channels and `cout` output channels. Sizes too small for a 3x3
/// window without padding are raised to 3.
fn layers(
    n: usize,
    size: usize,
    inputs: usize,
    c: usize,
    cout: usize,
) -> impl Strategy<Value = Layer> {
    (
        1..=n,
        1..=size,
        1..=size,
        prop::collection::vec(1..=c, 1..=inputs),
        prop::sample::select(vec![1usize, 3]),
        1usize..=2,
        0usize..=1,
        1..=cout,
    )
        .prop_map(|(n, h, w, channels, k, stride, pad, cout)| {
            let min = k.saturating_sub(2 * pad);
            Layer {
                n,
                h: h.max(min),
                w: w.max(min),
                channels,
                k,
                stride,
                pad,
                cout,
            }
        })
}

/// The operand values of one layer.
#[derive(Clone)]
struct Values {
    xs: Vec<Vec<f32>>,
    stats: Vec<f32>,
    affine: Vec<f32>,
    weight: Vec<f32>,
    /// Gradient of the convolution output.
    dy: Vec<f32>,
    /// Gradient of the ReLU output.
    dz: Vec<f32>,
}

/// Batch statistics of the concatenation, as the fusion pass computes them:
/// `BnStats` of every input, then `ConcatStats`.
fn batch_stats(layer: &Layer, xs: &[Vec<f32>]) -> Vec<f32> {
    let types = layer.input_types();
    let stats_types: Vec<TensorType> = layer
        .channels
        .iter()
        .map(|&c| TensorType::fixed(&[2, c]))
        .collect();
    let parts: Vec<Vec<f32>> = xs
        .iter()
        .zip(&types)
        .map(|(x, ty)| reference(&Op::BnStats, &[(x, ty)], layer.n))
        .collect();
    let operands: Vec<Operand> = parts
        .iter()
        .zip(&stats_types)
        .map(|(p, ty)| (p.as_slice(), ty))
        .collect();
    reference(&Op::ConcatStats, &operands, layer.n)
}

/// Concatenates the inputs with the reference `Concat`.
fn concat(layer: &Layer, xs: &[Vec<f32>]) -> Vec<f32> {
    let types = layer.input_types();
    let operands: Vec<Operand> = xs
        .iter()
        .zip(&types)
        .map(|(x, ty)| (x.as_slice(), ty))
        .collect();
    reference(&Op::Concat, &operands, layer.n)
}

/// Beta per channel that puts the kink of `u = gamma * xhat + beta` midway in
/// the widest gap between the sorted values `gamma * xhat` of the channel,
/// or 0.5 where the channel has a single value.
fn beta_in_widest_gap(layer: &Layer, x: &[f32], stats: &[f32], gamma: &[f32]) -> Vec<f32> {
    let c = layer.width();
    (0..c)
        .map(|ch| {
            let inv = 1.0 / (stats[c + ch] as f64 + EPS as f64).sqrt();
            let mut u: Vec<f64> = x
                .chunks_exact(c)
                .map(|row| gamma[ch] as f64 * (row[ch] as f64 - stats[ch] as f64) * inv)
                .collect();
            u.sort_by(f64::total_cmp);
            let widest = u
                .windows(2)
                .max_by(|a, b| (a[1] - a[0]).total_cmp(&(b[1] - b[0])))
                .filter(|pair| pair[1] - pair[0] > 1e-3);
            match widest {
                Some(pair) => (-(pair[0] + pair[1]) / 2.0) as f32,
                None => 0.5,
            }
        })
        .collect()
}

/// Draws the operands of `layer` from `seed`. Input `i` has its own offset
/// and spread, so that the channels have different statistics, and gamma is
/// at least 0.5 in magnitude, with either sign.
fn draw(layer: &Layer, seed: u64) -> Values {
    let types = layer.input_types();
    let xs: Vec<Vec<f32>> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            let offset = 0.5 * i as f32 - 0.7;
            let spread = 1.0 + 0.5 * i as f32;
            let raw = values(seed + i as u64, ty.numel(layer.n));
            raw.iter().map(|v| offset + spread * v).collect()
        })
        .collect();
    let stats = batch_stats(layer, &xs);

    let gamma: Vec<f32> = values(seed + 100, layer.width())
        .iter()
        .map(|v| v.signum() * (0.5 + v.abs()))
        .collect();
    let beta = beta_in_widest_gap(layer, &concat(layer, &xs), &stats, &gamma);
    let affine = [gamma, beta].concat();

    Values {
        xs,
        stats,
        affine,
        weight: values(seed + 101, layer.weight_type().numel(1)),
        dy: values(seed + 102, layer.out_type().numel(layer.n)),
        dz: values(seed + 103, layer.concat_type().numel(layer.n)),
    }
}

/// Types and values shared by the operand lists of one layer.
struct Operands {
    inputs: Vec<TensorType>,
    rows: TensorType,
    weight: TensorType,
    out: TensorType,
    concat: TensorType,
}

impl Operands {
    fn new(layer: &Layer) -> Operands {
        Operands {
            inputs: layer.input_types(),
            rows: layer.rows_type(),
            weight: layer.weight_type(),
            out: layer.out_type(),
            concat: layer.concat_type(),
        }
    }

    /// `(x_1, .., x_m, stats, affine, last)`, the operands of a fused op.
    fn fused<'a>(&'a self, v: &'a Values, last: Operand<'a>) -> Vec<Operand<'a>> {
        let mut operands: Vec<Operand> =
            v.xs.iter()
                .zip(&self.inputs)
                .map(|(x, ty)| (x.as_slice(), ty))
                .collect();
        operands.push((&v.stats, &self.rows));
        operands.push((&v.affine, &self.rows));
        operands.push(last);
        operands
    }
}

/// Lists the four fused ops with their operands.
fn fused_cases<'a>(
    layer: &Layer,
    types: &'a Operands,
    v: &'a Values,
) -> Vec<(Op, Vec<Operand<'a>>)> {
    vec![
        (
            layer.bn_relu_conv(),
            types.fused(v, (&v.weight, &types.weight)),
        ),
        (
            layer.bn_relu_conv_backward_filter(),
            types.fused(v, (&v.dy, &types.out)),
        ),
        (
            Op::BnReluBackward { eps: EPS },
            types.fused(v, (&v.dz, &types.concat)),
        ),
        (
            Op::BnReluAffineGrad { eps: EPS },
            types.fused(v, (&v.dz, &types.concat)),
        ),
    ]
}

/// Lists every run of consecutive inputs of `layer` as a range of input
/// indices.
fn input_runs(layer: &Layer) -> Vec<Range<usize>> {
    let m = layer.channels.len();
    (0..m)
        .flat_map(|first| (first + 1..=m).map(move |end| first..end))
        .collect()
}

/// `BnReluBackwardPart` for the inputs `run` of `layer`, with its operands
/// and the `Slice` of the concatenation's gradient that it computes.
/// `daffine` is the `BnReluAffineGrad` of the layer.
fn part_case<'a>(
    layer: &Layer,
    types: &'a Operands,
    v: &'a Values,
    daffine: &'a [f32],
    run: Range<usize>,
) -> (Op, Op, Vec<Operand<'a>>) {
    let start = layer.channels[..run.start].iter().sum();
    let len = layer.channels[run.clone()].iter().sum();
    let mut operands: Vec<Operand> = run
        .map(|i| (v.xs[i].as_slice(), &types.inputs[i]))
        .collect();
    operands.push((&v.stats, &types.rows));
    operands.push((&v.affine, &types.rows));
    operands.push((daffine, &types.rows));
    operands.push((&v.dz, &types.concat));
    let part = Op::BnReluBackwardPart { eps: EPS, start };
    (part, Op::Slice { start, len }, operands)
}

/// Checks every `BnReluBackwardPart` of `layer` in both sets against the
/// slice of the reference `BnReluBackward`, with the affine gradient of the
/// same set, and the fast set against the reference set.
fn check_parts(layer: &Layer, v: &Values) {
    let types = Operands::new(layer);
    let wide = types.fused(v, (&v.dz, &types.concat));
    let dx = reference(&Op::BnReluBackward { eps: EPS }, &wide, layer.n);
    for run in input_runs(layer) {
        let mut outputs = Vec::new();
        for set in [KernelSet::Reference, KernelSet::Fast] {
            let daffine = run_set(set, &Op::BnReluAffineGrad { eps: EPS }, &wide, layer.n);
            let (part, slice, operands) = part_case(layer, &types, v, &daffine, run.clone());
            let want = reference(&slice, &[(&dx, &types.concat)], layer.n);
            let got = run_set(set, &part, &operands, layer.n);
            assert_close(&got, &want, 1e-4, &format!("inputs {run:?} in {set:?}"));
            outputs.push(got);
        }
        let what = format!("inputs {run:?}");
        assert_close(&outputs[1], &outputs[0], 1e-4, &what);
    }
}

/// Runs `op` in `set`, which must accept the operands.
fn run_set(set: KernelSet, op: &Op, inputs: &[Operand], n: usize) -> Vec<f32> {
    run(set, op, inputs, n).unwrap_or_else(|e| panic!("{} in {set:?}: {e}", op.name()))
}

/// Computes fused op `op` with the unfused reference ops it replaces.
fn unfused(layer: &Layer, types: &Operands, v: &Values, op: &Op) -> Vec<f32> {
    let n = layer.n;
    let (rows, concat_ty) = (&types.rows, &types.concat);
    let x = concat(layer, &v.xs);
    let bn = Op::BnApply { eps: EPS };
    let u = reference(
        &bn,
        &[(&x, concat_ty), (&v.stats, rows), (&v.affine, rows)],
        n,
    );
    let z = reference(&Op::Relu, &[(&u, concat_ty)], n);
    let du = reference(&Op::ReluBackward, &[(&u, concat_ty), (&v.dz, concat_ty)], n);
    match op {
        Op::BnReluConv { .. } => reference(
            &layer.conv(),
            &[(&z, concat_ty), (&v.weight, &types.weight)],
            n,
        ),
        Op::BnReluConvBackwardFilter { k, stride, pad, .. } => {
            let filter = Op::Conv2dBackwardFilter {
                k: *k,
                stride: *stride,
                pad: *pad,
            };
            reference(&filter, &[(&z, concat_ty), (&v.dy, &types.out)], n)
        }
        Op::BnReluBackward { .. } => {
            let backward = Op::BnBackward { eps: EPS };
            let operands = [
                (x.as_slice(), concat_ty),
                (&v.stats, rows),
                (&v.affine, rows),
                (&du, concat_ty),
            ];
            reference(&backward, &operands, n)
        }
        Op::BnReluAffineGrad { .. } => {
            let grad = Op::BnAffineGrad { eps: EPS };
            reference(
                &grad,
                &[(&x, concat_ty), (&v.stats, rows), (&du, concat_ty)],
                n,
            )
        }
        _ => panic!("no unfused form for {}", op.name()),
    }
}

/// Statistics operands of `ConcatStats`: `BnStats` of every input.
fn input_stats(layer: &Layer, v: &Values) -> (Vec<Vec<f32>>, Vec<TensorType>) {
    let parts =
        v.xs.iter()
            .zip(layer.input_types())
            .map(|(x, ty)| reference(&Op::BnStats, &[(x, &ty)], layer.n))
            .collect();
    let types = layer
        .channels
        .iter()
        .map(|&c| TensorType::fixed(&[2, c]))
        .collect();
    (parts, types)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn fast_matches_reference(layer in layers(4, 7, 4, 7, 6), seed in any::<u64>()) {
        let v = draw(&layer, seed);
        let types = Operands::new(&layer);
        for (op, operands) in fused_cases(&layer, &types, &v) {
            let fast = run(KernelSet::Fast, &op, &operands, layer.n).expect("fast kernel runs");
            let want = reference(&op, &operands, layer.n);
            assert_close(&fast, &want, 1e-4, op.name());
        }

        let (parts, stats_types) = input_stats(&layer, &v);
        let operands: Vec<Operand> =
            parts.iter().zip(&stats_types).map(|(p, t)| (p.as_slice(), t)).collect();
        let fast = run(KernelSet::Fast, &Op::ConcatStats, &operands, layer.n)
            .expect("fast kernel runs");
        prop_assert_eq!(fast, reference(&Op::ConcatStats, &operands, layer.n));
    }

    #[test]
    fn backward_part_is_slice_of_backward(layer in layers(4, 7, 4, 7, 1), seed in any::<u64>()) {
        check_parts(&layer, &draw(&layer, seed));
    }

    #[test]
    fn fused_matches_unfused(layer in layers(4, 7, 4, 7, 6), seed in any::<u64>()) {
        let v = draw(&layer, seed);
        let types = Operands::new(&layer);
        for (op, operands) in fused_cases(&layer, &types, &v) {
            let want = unfused(&layer, &types, &v, &op);
            for set in [KernelSet::Reference, KernelSet::Fast] {
                let got = run(set, &op, &operands, layer.n).expect("fused kernel runs");
                assert_close(&got, &want, 1e-4, &format!("{} in {set:?}", op.name()));
            }
        }

        // The statistics of the concatenation are the concatenated statistics.
        let (parts, stats_types) = input_stats(&layer, &v);
        let operands: Vec<Operand> =
            parts.iter().zip(&stats_types).map(|(p, t)| (p.as_slice(), t)).collect();
        let x = concat(&layer, &v.xs);
        let want = reference(&Op::BnStats, &[(&x, &types.concat)], layer.n);
        for set in [KernelSet::Reference, KernelSet::Fast] {
            let got = run(set, &Op::ConcatStats, &operands, layer.n).expect("kernel runs");
            assert_close(&got, &want, 1e-6, &format!("concat_stats in {set:?}"));
        }
    }
}

/// Layers with more pixels than one 512-pixel block of the fast batch-norm
/// passes and more images than one convolution chunk.
#[test]
fn fast_matches_reference_over_many_blocks() {
    let base = Layer {
        n: 5,
        h: 15,
        w: 13,
        channels: vec![3, 16, 5, 12],
        k: 3,
        stride: 1,
        pad: 1,
        cout: 8,
    };
    let pointwise = Layer {
        k: 1,
        pad: 0,
        ..base.clone()
    };
    let strided = Layer {
        stride: 2,
        ..base.clone()
    };
    for (seed, layer) in [base, pointwise, strided].into_iter().enumerate() {
        let v = draw(&layer, seed as u64);
        if seed == 0 {
            check_parts(&layer, &v);
        }
        let types = Operands::new(&layer);
        for (op, operands) in fused_cases(&layer, &types, &v) {
            let fast = run(KernelSet::Fast, &op, &operands, layer.n).expect("fast kernel runs");
            let want = reference(&op, &operands, layer.n);
            assert_close(
                &fast,
                &want,
                1e-4,
                &format!("{} with k {}", op.name(), layer.k),
            );
        }
    }
}

/// Central-difference step for weights and affine parameters, and for inputs
/// in units of their channel's standard deviation. The objective sums f32
/// outputs of the reference forward, which carry a relative rounding error of
/// about 6e-8 each, so the noise of a difference quotient is about
/// `6e-8 * sqrt(outputs) / step` relative to the outputs.
const STEP: f64 = 3e-3;

/// Smallest channel standard deviation whose inputs the finite-difference
/// test probes. A two-pixel layer drew a channel with standard deviation 0.012,
/// where f32 rounding in the recomputed variance moved the difference quotient
/// by about 5%.
const MIN_PROBED_STD: f64 = 0.05;

/// Allowed `|analytic - difference| / (1 + |analytic|)`. It covers that noise
/// and the O(STEP) error of a one-sided difference.
const FD_TOL: f64 = 1e-2;

/// Evaluates the objective `sum(out * upstream)` of the reference
/// `BnReluConv`, with the batch statistics recomputed from `xs`, and the
/// ReLU mask `[u > 0]` of its batch-norm output.
fn objective(
    layer: &Layer,
    xs: &[Vec<f32>],
    affine: &[f32],
    weight: &[f32],
    upstream: &[f32],
) -> (f64, Vec<bool>) {
    let stats = batch_stats(layer, xs);
    let v = Values {
        xs: xs.to_vec(),
        stats,
        affine: affine.to_vec(),
        weight: weight.to_vec(),
        dy: Vec::new(),
        dz: Vec::new(),
    };
    let types = Operands::new(layer);
    let out = reference(
        &layer.bn_relu_conv(),
        &types.fused(&v, (weight, &types.weight)),
        layer.n,
    );
    let value = out
        .iter()
        .zip(upstream)
        .map(|(o, u)| *o as f64 * *u as f64)
        .sum();

    let x = concat(layer, xs);
    let rows = &types.rows;
    let operands = [
        (x.as_slice(), &types.concat),
        (&v.stats, rows),
        (affine, rows),
    ];
    let u = reference(&Op::BnApply { eps: EPS }, &operands, layer.n);
    (value, u.iter().map(|&u| u > 0.0).collect())
}

/// Compares `analytic` with differences of `f(t)`, which moves one
/// coordinate by about `t` and returns the move actually applied (after f32
/// rounding), the objective and the ReLU mask. Where the mask stays the same
/// on both sides the central difference must agree. Where a kink is crossed
/// on one side, the one-sided difference of the other side must agree.
/// Returns the kind of difference checked, or `None`, checking nothing, where
/// kinks are crossed on both sides.
fn check_derivative(
    analytic: f64,
    step: f64,
    f: impl Fn(f64) -> (f64, f64, Vec<bool>),
    what: &str,
) -> Option<&'static str> {
    let (_, l0, m0) = f(0.0);
    let (up, lp, mp) = f(step);
    let (down, lm, mm) = f(-step);
    let mut differences = Vec::new();
    if mp == m0 && mm == m0 {
        differences.push(("central", (lp - lm) / (up - down)));
    } else {
        if mp == m0 {
            differences.push(("forward", (lp - l0) / up));
        }
        if mm == m0 {
            differences.push(("backward", (l0 - lm) / -down));
        }
    }
    let tol = FD_TOL * (1.0 + analytic.abs());
    let agreed = differences
        .iter()
        .find(|(_, d)| (analytic - d).abs() <= tol);
    assert!(
        differences.is_empty() || agreed.is_some(),
        "{what}: analytic derivative {analytic}, differences {differences:?}"
    );
    agreed.map(|(kind, _)| *kind)
}

/// Adds `t` to `values[index]` and returns the change after f32 rounding.
fn nudge(values: &mut [f32], index: usize, t: f64) -> f64 {
    let before = values[index];
    values[index] += t as f32;
    values[index] as f64 - before as f64
}

/// `count` coordinates in `0..len`, drawn from `seed`, all of them when
/// `len <= count`.
fn coordinates(seed: u64, len: usize, count: usize) -> Vec<usize> {
    if len <= count {
        return (0..len).collect();
    }
    values(seed, count)
        .iter()
        .map(|v| (((v + 1.0) / 2.0 * len as f32) as usize).min(len - 1))
        .collect()
}

/// Computes the gradients `(d concat(x), dw, d affine)` of
/// `sum(out * upstream)` for `out = BnReluConv(x, stats, affine, w)`, with
/// the ops that the fusion pass emits: `d concat(x)` is the concatenation of
/// one `BnReluBackwardPart` per input, which must match `BnReluBackward`.
fn gradients(layer: &Layer, v: &Values, upstream: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let types = Operands::new(layer);
    let n = layer.n;
    let dz = reference(
        &layer.conv_backward_data(),
        &[(upstream, &types.out), (&v.weight, &types.weight)],
        n,
    );
    let dw = reference(
        &layer.bn_relu_conv_backward_filter(),
        &types.fused(v, (upstream, &types.out)),
        n,
    );
    let wide = reference(
        &Op::BnReluBackward { eps: EPS },
        &types.fused(v, (&dz, &types.concat)),
        n,
    );
    let daffine = reference(
        &Op::BnReluAffineGrad { eps: EPS },
        &types.fused(v, (&dz, &types.concat)),
        n,
    );
    let with_dz = Values {
        dz: dz.clone(),
        ..v.clone()
    };
    let parts: Vec<Vec<f32>> = (0..layer.channels.len())
        .map(|i| {
            let (part, _, operands) = part_case(layer, &types, &with_dz, &daffine, i..i + 1);
            reference(&part, &operands, n)
        })
        .collect();
    let dx = concat(layer, &parts);
    assert_close(&dx, &wide, 1e-5, "the parts of the input gradient");
    (dx, dw, daffine)
}

/// Checks `dx[index]`, the derivative for element `(pixel, ch)` of the
/// concatenation, which is element `(pixel, ch - first)` of the input whose
/// channels start at `first`. The step follows the channel's standard
/// deviation, because the batch norm divides by it.
fn check_input(
    layer: &Layer,
    v: &Values,
    upstream: &[f32],
    dx: &[f32],
    index: usize,
) -> Option<&'static str> {
    let c = layer.width();
    let (pixel, ch) = (index / c, index % c);
    let mut end = 0;
    let input = layer
        .channels
        .iter()
        .position(|&ci| {
            end += ci;
            ch < end
        })
        .expect("channel within the concatenation");
    let ci = layer.channels[input];
    let at = pixel * ci + ch - (end - ci);
    let moved = |t: f64| {
        let mut xs = v.xs.clone();
        let applied = nudge(&mut xs[input], at, t);
        let (value, mask) = objective(layer, &xs, &v.affine, &v.weight, upstream);
        (applied, value, mask)
    };
    let std = (v.stats[c + ch] as f64 + EPS as f64).sqrt();
    let what = format!("x[{pixel}, {ch}]");
    check_derivative(dx[index] as f64, STEP * std, moved, &what)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_differences(layer in layers(3, 6, 3, 4, 4), seed in any::<u64>()) {
        let v = draw(&layer, seed);
        let upstream = values(seed + 200, layer.out_type().numel(layer.n));
        let (dx, dw, daffine) = gradients(&layer, &v, &upstream);
        let mut checked = 0;
        let mut skipped = 0;
        let mut tally = |kind: Option<&str>| match kind {
            Some(_) => checked += 1,
            None => skipped += 1,
        };

        let c = layer.width();
        for index in coordinates(seed + 300, layer.pixels() * c, 20) {
            // The objective recomputes the batch variance in f32, whose
            // rounding is as large as the change a step makes on a nearly
            // constant channel, so those inputs are not probed.
            let std = (v.stats[c + index % c] as f64 + EPS as f64).sqrt();
            if std < MIN_PROBED_STD {
                continue;
            }
            tally(check_input(&layer, &v, &upstream, &dx, index));
        }

        for index in coordinates(seed + 301, dw.len(), 12) {
            let moved = |t: f64| {
                let mut weight = v.weight.clone();
                let applied = nudge(&mut weight, index, t);
                let (value, mask) = objective(&layer, &v.xs, &v.affine, &weight, &upstream);
                (applied, value, mask)
            };
            tally(check_derivative(dw[index] as f64, STEP, moved, &format!("w[{index}]")));
        }

        for (index, &analytic) in daffine.iter().enumerate() {
            let moved = |t: f64| {
                let mut affine = v.affine.clone();
                let applied = nudge(&mut affine, index, t);
                let (value, mask) = objective(&layer, &v.xs, &affine, &v.weight, &upstream);
                (applied, value, mask)
            };
            let what = format!("affine[{index}]");
            tally(check_derivative(analytic as f64, STEP, moved, &what));
        }

        prop_assert!(checked >= 4 * skipped, "{checked} derivatives checked, {skipped} skipped");
    }
}

#[test]
fn differences_step_off_relu_kink() {
    // One channel over a 3x3 image, gamma 1.5. Beta puts the batch-norm output
    // of pixel 0 at +-STEP / 2. Moving x0 by STEP standard deviations moves
    // xhat0 by about STEP * (1 - (1 + xhat0^2) / 9), at least 0.56 * STEP for
    // |xhat0| < 1.7, so it moves u0 by more than 0.8 * STEP in the direction
    // of the move: one step crosses the kink and the other does not.
    let layer = Layer {
        n: 1,
        h: 3,
        w: 3,
        channels: vec![1],
        k: 1,
        stride: 1,
        pad: 0,
        cout: 1,
    };
    let mut v = draw(&layer, 3);
    let upstream = values(4, layer.out_type().numel(1));
    let (x0, mean, var) = (v.xs[0][0] as f64, v.stats[0] as f64, v.stats[1] as f64);
    let xhat0 = (x0 - mean) / (var + EPS as f64).sqrt();
    assert!(
        xhat0.abs() < 1.7,
        "x0 is {xhat0} standard deviations from the mean"
    );
    v.affine[0] = 1.5;

    for (u0, valid) in [(STEP / 2.0, "forward"), (-STEP / 2.0, "backward")] {
        v.affine[1] = (u0 - 1.5 * xhat0) as f32;
        let (dx, _, _) = gradients(&layer, &v, &upstream);
        assert_eq!(
            check_input(&layer, &v, &upstream, &dx, 0),
            Some(valid),
            "u0 = {u0}"
        );
    }
}

#[test]
fn bn_relu_backward_rejects_mismatched_gradient() {
    let layer = Layer {
        n: 1,
        h: 2,
        w: 2,
        channels: vec![1, 2],
        k: 1,
        stride: 1,
        pad: 0,
        cout: 1,
    };
    let v = draw(&layer, 5);
    let types = Operands::new(&layer);
    // A gradient of the conv output in place of one of the ReLU output.
    let dy = vec![0.0; types.out.numel(1)];
    for set in [KernelSet::Reference, KernelSet::Fast] {
        let result = run(
            set,
            &Op::BnReluBackward { eps: EPS },
            &types.fused(&v, (&dy, &types.out)),
            1,
        );
        let err = result.expect_err("a [2, 2, 1] gradient for 3 channels is invalid");
        assert!(
            err.to_string().contains("differs from the concatenation"),
            "unexpected error: {err}"
        );
    }
}

#[test]
fn bn_relu_conv_rejects_batched_statistics() {
    let layer = Layer {
        n: 2,
        h: 3,
        w: 3,
        channels: vec![2],
        k: 3,
        stride: 1,
        pad: 1,
        cout: 2,
    };
    let v = draw(&layer, 9);
    let types = Operands::new(&layer);
    let batched = TensorType::batched(&[2, 2]);
    let stats = [v.stats.clone(), v.stats.clone()].concat();
    let mut operands = types.fused(&v, (&v.weight, &types.weight));
    operands[1] = (&stats, &batched);
    for set in [KernelSet::Reference, KernelSet::Fast] {
        let err = run(set, &layer.bn_relu_conv(), &operands, 2)
            .expect_err("statistics with a batch dimension are invalid");
        assert!(
            err.to_string().contains("statistics"),
            "unexpected error: {err}"
        );
    }
}
