//! Checks of the batch-norm fold kernels through `KernelSet::compute`: the
//! folded conv `Conv2dBias(x, BnFoldWeight(w, r, a), BnFoldBias(r, a))` must
//! match `BnApply(Conv2d(x, w), r, a)` (then ReLU when the epilogue
//! rectifies) in the reference set, the same for `BnReluConvBias` against
//! `BnReluConv`, and the fast set must match the reference set on every
//! fold op.

mod common;

use common::{run, values};
use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::KernelSet;
use proptest::prelude::*;

const EPS: f32 = 1e-5;
const TOL: f32 = 1e-4;

/// Running statistics `[mean; var]` with variances in `[0.25, 1.25)`.
fn running(seed: u64, c: usize) -> Vec<f32> {
    let mut r = values(seed, 2 * c);
    r[c..].iter_mut().for_each(|v| *v = 0.75 + *v / 2.0);
    r
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= TOL * scale,
            "{what}: element {i} is {a}, expected {b}"
        );
    }
}

/// One conv followed by a batch norm with running statistics.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    size: usize,
    parts: Vec<usize>,
    k: usize,
    stride: usize,
    pad: usize,
    cout: usize,
    relu: bool,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..4,
        3usize..7,
        prop::collection::vec(1usize..5, 1..4),
        prop::sample::select(vec![(1, 0), (3, 0), (3, 1)]),
        1usize..3,
        1usize..6,
        any::<bool>(),
    )
        .prop_map(|(n, size, parts, (k, pad), stride, cout, relu)| Case {
            n,
            size,
            parts,
            k,
            stride,
            pad,
            cout,
            relu,
        })
}

/// The tensors of one case, drawn from `seed`.
struct Tensors {
    xs: Vec<(Vec<f32>, TensorType)>,
    input_rows: (Vec<f32>, Vec<f32>, TensorType),
    weight: (Vec<f32>, TensorType),
    running: Vec<f32>,
    affine: Vec<f32>,
    rows: TensorType,
}

impl Case {
    fn cin(&self) -> usize {
        self.parts.iter().sum()
    }

    fn draw(&self, seed: u64) -> Tensors {
        let xs = self
            .parts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let ty = TensorType::batched(&[self.size, self.size, c]);
                (values(seed + i as u64, ty.numel(self.n)), ty)
            })
            .collect();
        let cin = self.cin();
        let w_ty = TensorType::fixed(&[self.k, self.k, cin, self.cout]);
        Tensors {
            xs,
            input_rows: (
                running(seed + 10, cin),
                values(seed + 11, 2 * cin),
                TensorType::fixed(&[2, cin]),
            ),
            weight: (values(seed + 12, w_ty.per_item()), w_ty),
            running: running(seed + 13, self.cout),
            affine: values(seed + 14, 2 * self.cout),
            rows: TensorType::fixed(&[2, self.cout]),
        }
    }

    /// The folded weight and bias from the reference set.
    fn folded(&self, t: &Tensors, set: KernelSet) -> (Vec<f32>, Vec<f32>) {
        let (w, w_ty) = (&t.weight.0, &t.weight.1);
        let fold = [(&t.running[..], &t.rows), (&t.affine[..], &t.rows)];
        let weight = run(
            set,
            &Op::BnFoldWeight { eps: EPS },
            &[(w, w_ty), fold[0], fold[1]],
            self.n,
        );
        let bias = run(set, &Op::BnFoldBias { eps: EPS }, &fold, self.n);
        (weight, bias)
    }

    /// `bn(y)` with the case's running statistics, then ReLU when the case
    /// rectifies: the unfolded ops that the folded conv replaces.
    fn normalised(&self, t: &Tensors, y: &[f32], y_ty: &TensorType) -> Vec<f32> {
        let bn = run(
            KernelSet::Reference,
            &Op::BnApply { eps: EPS },
            &[(y, y_ty), (&t.running, &t.rows), (&t.affine, &t.rows)],
            self.n,
        );
        if self.relu {
            run(KernelSet::Reference, &Op::Relu, &[(&bn, y_ty)], self.n)
        } else {
            bn
        }
    }
}

/// Output type of `op` on `inputs`.
fn output_type(op: &Op, inputs: &[(&[f32], &TensorType)]) -> TensorType {
    let types: Vec<&TensorType> = inputs.iter().map(|x| x.1).collect();
    op.infer(&types).expect("the operands fit the op")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn folded_conv_matches_conv_then_bn(case in cases(), seed in 0u64..10_000) {
        let t = case.draw(seed);
        let cin = case.cin();
        let x_ty = TensorType::batched(&[case.size, case.size, cin]);
        let x = values(seed + 20, x_ty.numel(case.n));
        let (w, w_ty) = (&t.weight.0, &t.weight.1);
        let conv = Op::Conv2d { k: case.k, stride: case.stride, pad: case.pad };
        let y_ty = output_type(&conv, &[(&x, &x_ty), (w, w_ty)]);
        let y = run(KernelSet::Reference, &conv, &[(&x, &x_ty), (w, w_ty)], case.n);
        let want = case.normalised(&t, &y, &y_ty);

        let op = Op::Conv2dBias { k: case.k, stride: case.stride, pad: case.pad, relu: case.relu };
        let bias_ty = TensorType::fixed(&[case.cout]);
        for set in [KernelSet::Reference, KernelSet::Fast] {
            let (fw, fb) = case.folded(&t, set);
            let got = run(set, &op, &[(&x, &x_ty), (&fw, w_ty), (&fb, &bias_ty)], case.n);
            assert_close(&got, &want, &format!("{set:?} {case:?}"));
        }
    }

    #[test]
    fn folded_bn_relu_conv_matches_unfolded(case in cases(), seed in 0u64..10_000) {
        let t = case.draw(seed);
        let (w, w_ty) = (&t.weight.0, &t.weight.1);
        let (stats, affine, rows) = (&t.input_rows.0, &t.input_rows.1, &t.input_rows.2);
        let mut operands: Vec<(&[f32], &TensorType)> =
            t.xs.iter().map(|(data, ty)| (&data[..], ty)).collect();
        operands.extend([(&stats[..], rows), (&affine[..], rows), (&w[..], w_ty)]);
        let conv = Op::BnReluConv { k: case.k, stride: case.stride, pad: case.pad, eps: EPS };
        let y_ty = output_type(&conv, &operands);
        let y = run(KernelSet::Reference, &conv, &operands, case.n);
        let want = case.normalised(&t, &y, &y_ty);

        let op = Op::BnReluConvBias {
            k: case.k,
            stride: case.stride,
            pad: case.pad,
            eps: EPS,
            relu: case.relu,
        };
        let bias_ty = TensorType::fixed(&[case.cout]);
        for set in [KernelSet::Reference, KernelSet::Fast] {
            let (fw, fb) = case.folded(&t, set);
            let mut folded = operands.clone();
            *folded.last_mut().expect("operands end with the weight") = (&fw, w_ty);
            folded.push((&fb, &bias_ty));
            let got = run(set, &op, &folded, case.n);
            assert_close(&got, &want, &format!("{set:?} {case:?}"));
        }
    }
}

#[test]
fn fold_ops_reject_mismatched_rows() {
    let w = TensorType::fixed(&[1, 1, 2, 3]);
    let rows = TensorType::fixed(&[2, 4]);
    let err = Op::BnFoldWeight { eps: EPS }
        .infer(&[&w, &rows, &rows])
        .expect_err("4 channels of statistics for a 3-channel conv");
    assert!(err.contains("must be [2, 3]"), "{err}");
    let bias = TensorType::fixed(&[4]);
    let x = TensorType::batched(&[3, 3, 2]);
    let conv = Op::Conv2dBias {
        k: 1,
        stride: 1,
        pad: 0,
        relu: false,
    };
    let err = conv
        .infer(&[&x, &w, &bias])
        .expect_err("bias of 4 for 3 channels");
    assert!(err.contains("bias"), "{err}");
}
