//! Checks of the fused BN-ReLU pools: `BnReluGlobalAvgPool`, the
//! classification head `global_avg_pool(relu(bn(concat(x_1 .. x_m))))`, and
//! `BnReluAvgPool`, the same with a windowed average pool. The reference
//! kernels must match the unfused reference ops, the fast kernels the
//! reference kernels, and the gradient of the fused training graph (the
//! pool's backward, then `BnReluBackward` and `BnReluAffineGrad` through the
//! batch statistics) must match central differences of the reference forward.

mod common;

use common::{run, values};
use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::KernelSet;
use proptest::prelude::*;

const EPS: f32 = 1e-5;

fn reference(op: &Op, inputs: &[(&[f32], &TensorType)], n: usize) -> Vec<f32> {
    run(KernelSet::Reference, op, inputs, n)
}

/// One pool: `n` images of `size x size` pixels, the inputs' channels, and
/// the `(k, stride, pad)` window of an average pool, or `None` for the
/// global average pool of a head.
#[derive(Debug, Clone)]
struct Head {
    n: usize,
    size: usize,
    parts: Vec<usize>,
    window: Option<(usize, usize, usize)>,
}

fn heads() -> impl Strategy<Value = Head> {
    let windows = prop::sample::select(vec![
        None,
        Some((2, 2, 0)),
        Some((3, 1, 1)),
        Some((3, 2, 1)),
    ]);
    (
        1usize..4,
        1usize..6,
        prop::collection::vec(1usize..5, 1..4),
        windows,
    )
        .prop_filter(
            "the window must fit the padded image",
            |(_, size, _, window)| window.is_none_or(|(k, _, pad)| size + 2 * pad >= k),
        )
        .prop_map(|(n, size, parts, window)| Head {
            n,
            size,
            parts,
            window,
        })
}

impl Head {
    /// The fused op under test.
    fn fused(&self) -> Op {
        match self.window {
            None => Op::BnReluGlobalAvgPool { eps: EPS },
            Some((k, stride, pad)) => Op::BnReluAvgPool {
                k,
                stride,
                pad,
                eps: EPS,
            },
        }
    }

    /// The unfused pool that the fused op applies to `relu(bn(x))`.
    fn pool(&self) -> Op {
        match self.window {
            None => Op::GlobalAvgPool,
            Some((k, stride, pad)) => Op::AvgPool { k, stride, pad },
        }
    }

    /// The backward op of [`Head::pool`].
    fn pool_backward(&self) -> Op {
        let (h, w) = (self.size, self.size);
        match self.window {
            None => Op::GlobalAvgPoolBackward { h, w },
            Some((k, stride, pad)) => Op::AvgPoolBackward {
                k,
                stride,
                pad,
                in_h: h,
                in_w: w,
            },
        }
    }

    fn width(&self) -> usize {
        self.parts.iter().sum()
    }

    fn types(&self) -> Vec<TensorType> {
        self.parts
            .iter()
            .map(|&c| TensorType::batched(&[self.size, self.size, c]))
            .collect()
    }

    fn concat_type(&self) -> TensorType {
        TensorType::batched(&[self.size, self.size, self.width()])
    }

    fn rows_type(&self) -> TensorType {
        TensorType::fixed(&[2, self.width()])
    }

    fn draw(&self, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
        let xs = self
            .types()
            .iter()
            .enumerate()
            .map(|(i, ty)| values(seed + i as u64, ty.numel(self.n)))
            .collect();
        (xs, values(seed + 100, 2 * self.width()))
    }

    /// The concatenation of `xs` and its batch statistics.
    fn concat_and_stats(&self, xs: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
        let types = self.types();
        let parts: Vec<(&[f32], &TensorType)> =
            xs.iter().zip(&types).map(|(x, ty)| (&x[..], ty)).collect();
        let concat = reference(&Op::Concat, &parts, self.n);
        let stats = reference(&Op::BnStats, &[(&concat, &self.concat_type())], self.n);
        (concat, stats)
    }

    /// The fused op's output in `set`, with batch statistics.
    fn pooled(&self, set: KernelSet, xs: &[Vec<f32>], affine: &[f32]) -> Vec<f32> {
        let (_, stats) = self.concat_and_stats(xs);
        let types = self.types();
        let rows = self.rows_type();
        let mut operands: Vec<(&[f32], &TensorType)> =
            xs.iter().zip(&types).map(|(x, ty)| (&x[..], ty)).collect();
        operands.extend([(&stats[..], &rows), (affine, &rows)]);
        run(set, &self.fused(), &operands, self.n)
    }

    /// The ReLU mask `bn(x) > 0` of the concatenation, with batch statistics.
    fn mask(&self, xs: &[Vec<f32>], affine: &[f32]) -> Vec<bool> {
        let (concat, stats) = self.concat_and_stats(xs);
        let rows = self.rows_type();
        let concat_ty = self.concat_type();
        let u = reference(
            &Op::BnApply { eps: EPS },
            &[(&concat, &concat_ty), (&stats, &rows), (affine, &rows)],
            self.n,
        );
        u.iter().map(|&v| v > 0.0).collect()
    }
}

/// Output type of the one-operand op `op` on `input`.
fn output_type(op: &Op, input: &TensorType) -> TensorType {
    op.infer(&[input]).expect("the pool fits the input")
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: element {i} is {a}, expected {b}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fused_head_matches_unfused_ops(head in heads(), seed in 0u64..10_000) {
        let (xs, affine) = head.draw(seed);
        let (concat, stats) = head.concat_and_stats(&xs);
        let concat_ty = head.concat_type();
        let rows = head.rows_type();
        let u = reference(
            &Op::BnApply { eps: EPS },
            &[(&concat, &concat_ty), (&stats, &rows), (&affine, &rows)],
            head.n,
        );
        let z = reference(&Op::Relu, &[(&u, &concat_ty)], head.n);
        let want = reference(&head.pool(), &[(&z, &concat_ty)], head.n);

        let got = head.pooled(KernelSet::Reference, &xs, &affine);
        assert_close(&got, &want, 1e-6, "reference");
        let fast = head.pooled(KernelSet::Fast, &xs, &affine);
        assert_close(&fast, &got, 1e-5, "fast");
    }

    #[test]
    fn fused_head_gradient_matches_differences(head in heads(), seed in 0u64..10_000) {
        let (xs, affine) = head.draw(seed);
        let n = head.n;
        let c = head.width();
        let pooled_ty = output_type(&head.pool(), &head.concat_type());
        let upstream = values(seed + 200, pooled_ty.numel(n));
        let objective = |xs: &[Vec<f32>], affine: &[f32]| -> f64 {
            let y = head.pooled(KernelSet::Reference, xs, affine);
            y.iter().zip(&upstream).map(|(&a, &b)| a as f64 * b as f64).sum()
        };

        // The gradient terms autodiff emits for pool(relu(bn(x))), as the
        // fused backward ops that fusion turns them into.
        let (_, stats) = head.concat_and_stats(&xs);
        let types = head.types();
        let rows = head.rows_type();
        let dz = reference(&head.pool_backward(), &[(&upstream, &pooled_ty)], n);
        let concat_ty = head.concat_type();
        let mut operands: Vec<(&[f32], &TensorType)> =
            xs.iter().zip(&types).map(|(x, ty)| (&x[..], ty)).collect();
        operands.extend([(&stats[..], &rows), (&affine[..], &rows), (&dz[..], &concat_ty)]);
        let dx = reference(&Op::BnReluBackward { eps: EPS }, &operands, n);
        let daffine = reference(&Op::BnReluAffineGrad { eps: EPS }, &operands, n);

        let mask = head.mask(&xs, &affine);
        let mut checked = 0;
        // Every affine parameter, and the first element of each input.
        // Steps on an input follow its channel's standard deviation, because
        // batch norm divides by it; a nearly constant channel is skipped.
        let mut probes: Vec<(Option<usize>, usize, f32, f32)> =
            (0..2 * c).map(|i| (None, i, daffine[i], 1e-2)).collect();
        let mut first = 0;
        for (part, &ci) in head.parts.iter().enumerate() {
            let std = (stats[c + first] + EPS).sqrt();
            if std > 0.05 {
                probes.push((Some(part), 0, dx[first], 1e-2 * std));
            }
            first += ci;
        }
        for (part, index, analytic, step) in probes {
            let moved = |t: f32| {
                let (mut xs, mut affine) = (xs.clone(), affine.clone());
                match part {
                    Some(p) => xs[p][index] += t,
                    None => affine[index] += t,
                }
                (objective(&xs, &affine), head.mask(&xs, &affine))
            };
            let (up, up_mask) = moved(step);
            let (down, down_mask) = moved(-step);
            if up_mask != mask || down_mask != mask {
                continue;
            }
            let numeric = (up - down) / (2.0 * step as f64);
            let what = format!("{part:?}[{index}]");
            prop_assert!(
                (numeric - analytic as f64).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "{}: analytic {}, central difference {}", what, analytic, numeric
            );
            checked += 1;
        }
        // When every probe flips some ReLU mask, as in a head of one channel
        // over a few pixels, no difference can check the gradient, so
        // proptest draws another case in its place.
        prop_assume!(checked > 0 || mask.iter().all(|&m| !m), "no probe kept its ReLU mask");
    }
}
