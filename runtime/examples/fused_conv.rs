//! Times the fused `BnReluConv` of the fast kernel set against the unfused
//! fast sequence `Concat`, `BnApply`, `Relu`, `Conv2d`. Both run two
//! DenseNet-like layers at batch 64 and 16x16 pixels. The first has eight
//! 12-channel inputs and a 1x1 conv to 48 channels, and the second has one
//! 48-channel input and a 3x3 conv (padding 1) to 12 channels, for which the
//! unfused sequence skips `Concat`.
//!
//! Run it with `cargo run --release -p ldnc-runtime --example fused_conv`.
//! `-- --peak fused 0` (or `unfused`, and layer 0 or 1) instead runs one
//! variant of one layer once and prints the growth of the peak resident set
//! (`VmHWM` in `/proc/self/status`, Linux only) over the operands and the
//! output. That growth measures the temporaries the variant touches, to page
//! granularity.

use ldnc_ir::{Op, TensorType};
use ldnc_runtime::kernels::{Ctx, In, KernelSet};
use std::time::Instant;

const N: usize = 64;
const SIZE: usize = 16;
const EPS: f32 = 1e-5;
const REPEATS: usize = 7;

/// One benchmark layer: `conv(relu(bn(concat(inputs))))`.
struct Layer {
    name: &'static str,
    inputs: usize,
    channels: usize,
    k: usize,
    pad: usize,
    cout: usize,
}

const LAYERS: [Layer; 2] = [
    Layer {
        name: "8 x 12 channels, 1x1 conv to 48",
        inputs: 8,
        channels: 12,
        k: 1,
        pad: 0,
        cout: 48,
    },
    Layer {
        name: "1 x 48 channels, 3x3 conv to 12",
        inputs: 1,
        channels: 48,
        k: 3,
        pad: 1,
        cout: 12,
    },
];

/// Operand values and types of one layer.
struct Data {
    xs: Vec<Vec<f32>>,
    x_ty: TensorType,
    concat_ty: TensorType,
    stats: Vec<f32>,
    affine: Vec<f32>,
    rows_ty: TensorType,
    weight: Vec<f32>,
    weight_ty: TensorType,
    out_ty: TensorType,
}

/// Pseudo-random values in `[-1, 1)` from a linear congruential generator
/// (the constants of Knuth's MMIX).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

impl Layer {
    fn width(&self) -> usize {
        self.inputs * self.channels
    }

    fn conv(&self) -> Op {
        Op::Conv2d {
            k: self.k,
            stride: 1,
            pad: self.pad,
        }
    }

    fn fused(&self) -> Op {
        Op::BnReluConv {
            k: self.k,
            stride: 1,
            pad: self.pad,
            eps: EPS,
        }
    }

    /// Draws inputs, batch statistics near their true values, and weights.
    fn data(&self) -> Data {
        let c = self.width();
        let pixels = N * SIZE * SIZE;
        let xs = (0..self.inputs)
            .map(|i| values(i as u64, pixels * self.channels))
            .collect();
        // Uniform values in [-1, 1) have mean 0 and variance 1/3.
        let stats = [vec![0.0; c], vec![1.0 / 3.0; c]].concat();
        let affine = [values(100, c), values(101, c)].concat();
        Data {
            xs,
            x_ty: TensorType::batched(&[SIZE, SIZE, self.channels]),
            concat_ty: TensorType::batched(&[SIZE, SIZE, c]),
            stats,
            affine,
            rows_ty: TensorType::fixed(&[2, c]),
            weight: values(102, self.k * self.k * c * self.cout),
            weight_ty: TensorType::fixed(&[self.k, self.k, c, self.cout]),
            out_ty: TensorType::batched(&[SIZE, SIZE, self.cout]),
        }
    }
}

/// Runs `op` in the fast set and panics on an error, because the
/// benchmark's operands always fit.
fn compute(op: &Op, inputs: &[In], out: &mut [f32], out_ty: &TensorType) {
    let ctx = Ctx { n: N, seed: 0 };
    KernelSet::Fast
        .compute(op, inputs, out, out_ty, &ctx)
        .unwrap_or_else(|e| panic!("{} failed: {e}", op.name()));
}

/// Runs the fused op into `out`.
fn run_fused(layer: &Layer, d: &Data, out: &mut [f32]) {
    let mut operands: Vec<In> =
        d.xs.iter()
            .map(|x| In {
                data: x,
                ty: &d.x_ty,
            })
            .collect();
    operands.push(In {
        data: &d.stats,
        ty: &d.rows_ty,
    });
    operands.push(In {
        data: &d.affine,
        ty: &d.rows_ty,
    });
    operands.push(In {
        data: &d.weight,
        ty: &d.weight_ty,
    });
    compute(&layer.fused(), &operands, out, &d.out_ty);
}

/// The buffers the unfused sequence materialises: the concatenation (for
/// more than one input), the batch-norm output and the ReLU output.
struct Buffers {
    concat: Vec<f32>,
    normalised: Vec<f32>,
    rectified: Vec<f32>,
}

impl Buffers {
    fn new(layer: &Layer, d: &Data) -> Buffers {
        let len = d.concat_ty.numel(N);
        let concat_len = if layer.inputs > 1 { len } else { 0 };
        Buffers {
            concat: vec![0.0; concat_len],
            normalised: vec![0.0; len],
            rectified: vec![0.0; len],
        }
    }

    fn bytes(&self) -> usize {
        4 * (self.concat.len() + self.normalised.len() + self.rectified.len())
    }
}

/// Runs `Concat`, `BnApply`, `Relu` and `Conv2d` into `out`.
fn run_unfused(layer: &Layer, d: &Data, b: &mut Buffers, out: &mut [f32]) {
    let concat_ty = &d.concat_ty;
    let x: &[f32] = if layer.inputs > 1 {
        let parts: Vec<In> =
            d.xs.iter()
                .map(|x| In {
                    data: x,
                    ty: &d.x_ty,
                })
                .collect();
        compute(&Op::Concat, &parts, &mut b.concat, concat_ty);
        &b.concat
    } else {
        &d.xs[0]
    };
    let bn = [
        In {
            data: x,
            ty: concat_ty,
        },
        In {
            data: &d.stats,
            ty: &d.rows_ty,
        },
        In {
            data: &d.affine,
            ty: &d.rows_ty,
        },
    ];
    compute(&Op::BnApply { eps: EPS }, &bn, &mut b.normalised, concat_ty);
    let relu = [In {
        data: &b.normalised,
        ty: concat_ty,
    }];
    compute(&Op::Relu, &relu, &mut b.rectified, concat_ty);
    let conv = [
        In {
            data: &b.rectified,
            ty: concat_ty,
        },
        In {
            data: &d.weight,
            ty: &d.weight_ty,
        },
    ];
    compute(&layer.conv(), &conv, out, &d.out_ty);
}

/// Median wall time of `REPEATS` runs of `f` after one warm-up run, in ms.
fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

/// Peak resident set size in bytes, from `VmHWM` in `/proc/self/status`.
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Times both variants of every layer and compares their outputs.
fn time_all() {
    let threads = rayon::current_num_threads();
    println!("batch {N}, {SIZE}x{SIZE} pixels, {threads} rayon threads, median of {REPEATS} runs");
    for layer in &LAYERS {
        let d = layer.data();
        let mut fused = vec![0.0; d.out_ty.numel(N)];
        let mut unfused = fused.clone();
        let mut buffers = Buffers::new(layer, &d);

        let fused_ms = median_ms(|| run_fused(layer, &d, &mut fused));
        let unfused_ms = median_ms(|| run_unfused(layer, &d, &mut buffers, &mut unfused));
        let max_diff = fused
            .iter()
            .zip(&unfused)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));

        // Each rayon task of the fused kernel packs one block of 256 output
        // pixels by k * k * C values.
        let block = 256 * layer.k * layer.k * layer.width() * 4;
        println!("{}:", layer.name);
        println!("  fused   {fused_ms:8.2} ms, temporaries {block} B per rayon task");
        println!(
            "  unfused {unfused_ms:8.2} ms, temporaries {} B of layer buffers{}",
            buffers.bytes(),
            if layer.k > 1 {
                format!(" plus {block} B of im2col per rayon task")
            } else {
                String::new()
            }
        );
        println!("  max |fused - unfused| = {max_diff:e}");
    }
}

/// Runs one variant of one layer and prints the growth of the peak resident
/// set over the operands and the output.
fn measure_peak(variant: &str, layer: &Layer) {
    let d = layer.data();
    // Writing the output first makes its pages resident before the baseline,
    // and a broadcast starts the rayon threads before it too.
    let mut out = vec![1.0; d.out_ty.numel(N)];
    rayon::broadcast(|_| std::hint::black_box(vec![1u8; 4096]));
    let before = peak_rss();
    match variant {
        "fused" => run_fused(layer, &d, &mut out),
        _ => run_unfused(layer, &d, &mut Buffers::new(layer, &d), &mut out),
    }
    let growth = before.zip(peak_rss()).map(|(b, a)| a.saturating_sub(b));
    match growth {
        Some(bytes) => println!("{variant}, {}: peak grew by {bytes} B", layer.name),
        None => println!(
            "{variant}, {}: /proc/self/status is unavailable",
            layer.name
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => time_all(),
        ["--peak", variant @ ("fused" | "unfused"), index @ ("0" | "1")] => {
            measure_peak(variant, &LAYERS[usize::from(index == "1")])
        }
        _ => {
            eprintln!("usage: fused_conv [--peak fused|unfused 0|1]");
            std::process::exit(2);
        }
    }
}
