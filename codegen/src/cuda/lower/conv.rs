//! Convolutions, transposed convolutions and their gradients as one
//! implicit-GEMM kernel template over NHWC tensors.
//!
//! Each op is a product `C[M, N] = A[M, K] B[K, N]` whose operands are never
//! materialised: the kernel computes the address of `A[row, col]` from the
//! window geometry while it loads a tile. Weights `[k, k, cin, cout]` are
//! already a `[k * k * cin, cout]` matrix. The mapping per op (big side =
//! convolution input, small side = window positions):
//!
//! | op | M | N | K | A | B |
//! |---|---|---|---|---|---|
//! | `Conv2d` | small pixels | cout | taps x cin | x gathered at each tap | w |
//! | `Conv2dBackwardData` | big pixels | cin | taps x cout | dy of the positions reaching the pixel | w transposed |
//! | `Conv2dBackwardFilter` (per tap) | cin | cout | small pixels | x at the tap | dy |
//! | `ConvTranspose2d` | big pixels | cout | taps x cin | x of the positions reaching the pixel | w |
//! | `ConvTranspose2dBackwardData` | small pixels | cin | taps x cout | dy gathered at each tap | w transposed |
//! | `ConvTranspose2dBackwardFilter` (per tap) | cin | cout | small pixels | x | dy at the tap |
//!
//! A block of 256 threads computes a `TILE_M x TILE_N` tile of C, each thread
//! a 4 x 4 grid of outputs spaced 16 apart, stepping through K in chunks of
//! `TILE_K` staged in shared memory. Rows, columns and K steps past the matrix
//! edge load zeros, so sizes that do not divide the tiles need no special
//! case. The filter gradients run one grid layer per tap and reduce over the
//! whole batch inside one block, so they are deterministic without atomics.
//!
//! The fused `BnReluConv` and its filter gradient in [`super::fused`] use
//! this template with their own A loader, through `emit` and
//! `Geometry::big_at_small_with`.

use ldnc_ir::{Op, TensorType};

use super::pool::window_count;
use super::{hwc, unsupported, LoweredStep, Lowering};
use crate::cuda::builder::{Buffer, KernelBuilder};
use crate::cuda::kernel::{block_idx, ceil_div, int, thread_idx, Axis, Expr};
use crate::cuda::Result;

/// Rows of C per block.
pub const TILE_M: usize = 64;
/// Columns of C per block.
pub const TILE_N: usize = 64;
/// Depth of the K chunk staged in shared memory per step.
pub const TILE_K: usize = 8;
/// Outputs per thread along each of M and N.
const MICRO: usize = 4;
/// Threads along each side of the 16 x 16 thread grid of a block.
const SIDE: usize = 16;
pub(super) const GEMM_THREADS: usize = SIDE * SIDE;

/// Geometry of a sliding window between a big and a small image.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    k: usize,
    stride: usize,
    pad: usize,
    bh: usize,
    bw: usize,
    sh: usize,
    sw: usize,
}

impl Geometry {
    pub(super) fn new(
        op: &Op,
        big: &TensorType,
        small: &TensorType,
        (k, stride, pad): (usize, usize, usize),
    ) -> Result<Geometry> {
        let (bh, bw, _) = hwc(op, big)?;
        let (sh, sw, _) = hwc(op, small)?;
        let swept = window_count(bh, k, stride, pad).zip(window_count(bw, k, stride, pad));
        if swept != Some((sh, sw)) {
            return Err(unsupported(
                op,
                format!("a {k}x{k} window with stride {stride} and padding {pad} over {big} gives {swept:?} positions, not {small}"),
            ));
        }
        Ok(Geometry {
            k,
            stride,
            pad,
            bh,
            bw,
            sh,
            sw,
        })
    }

    pub(super) fn taps(&self) -> usize {
        self.k * self.k
    }

    /// Pixels of one small-side image: window positions per image.
    pub(super) fn small_pixels(&self) -> usize {
        self.sh * self.sw
    }

    /// The value of `buf` (big side, `c` channels) that tap `tap` of small
    /// pixel `s` reads, or 0 in the padding.
    fn big_at_small(
        &self,
        b: &mut KernelBuilder,
        buf: Buffer,
        c: usize,
        s: &Expr,
        tap: &Expr,
        ch: &Expr,
    ) -> Expr {
        self.big_at_small_with(b, s, tap, |pixel| buf.load(pixel * int(c) + ch))
    }

    /// The value `load(pixel)` of the big-side pixel that tap `tap` of small
    /// pixel `s` reads, or 0 in the padding. `pixel` is the flat index
    /// `(img * bh + by) * bw + bx` over the batch. The kernel evaluates the
    /// expression `load` builds only when the tap is inside the image, so it
    /// may index with `pixel` freely.
    pub(super) fn big_at_small_with(
        &self,
        b: &mut KernelBuilder,
        s: &Expr,
        tap: &Expr,
        load: impl FnOnce(&Expr) -> Expr,
    ) -> Expr {
        let g = *self;
        let img = b.let_("img", s / int(g.sh * g.sw));
        let sy = b.let_("sy", (s / int(g.sw)) % int(g.sh));
        let sx = b.let_("sx", s % int(g.sw));
        let by = b.let_("by", sy * int(g.stride) + tap / int(g.k) - int(g.pad));
        let bx = b.let_("bx", sx * int(g.stride) + tap % int(g.k) - int(g.pad));
        let inside = by
            .ge(0)
            .and(by.lt(int(g.bh)))
            .and(bx.ge(0))
            .and(bx.lt(int(g.bw)));
        let pixel = (img * int(g.bh) + &by) * int(g.bw) + &bx;
        inside.select(load(&pixel), 0.0f32)
    }

    /// The value of `buf` (small side, `c` channels) at the window position
    /// whose tap `tap` reaches big pixel `p`, or 0 where none does.
    fn small_at_big(
        &self,
        b: &mut KernelBuilder,
        buf: Buffer,
        c: usize,
        p: &Expr,
        tap: &Expr,
        ch: &Expr,
    ) -> Expr {
        let g = *self;
        let img = b.let_("img", p / int(g.bh * g.bw));
        let by = b.let_("by", (p / int(g.bw)) % int(g.bh));
        let bx = b.let_("bx", p % int(g.bw));
        // Tap t of position s reaches s * stride + t - pad.
        let ty = b.let_("ty", by + int(g.pad) - tap / int(g.k));
        let tx = b.let_("tx", bx + int(g.pad) - tap % int(g.k));
        let s = int(g.stride);
        let reaches = |t: &Expr, limit: usize| {
            t.ge(0)
                .and((t % s.clone()).equals(0))
                .and((t / s.clone()).lt(int(limit)))
        };
        let hit = reaches(&ty, g.sh).and(reaches(&tx, g.sw));
        let index =
            ((img * int(g.sh) + &ty / s.clone()) * int(g.sw) + &tx / s.clone()) * int(c) + ch;
        hit.select(buf.load(index), 0.0f32)
    }
}

/// Loads one element of an operand tile: arguments are the builder, the
/// matrix row, the matrix column and the grid layer `blockIdx.z`.
pub(super) type Loader<'a> = &'a dyn Fn(&mut KernelBuilder, &Expr, &Expr, &Expr) -> Expr;

/// One implicit GEMM.
pub(super) struct Gemm<'a> {
    pub(super) m: Expr,
    pub(super) n: Expr,
    pub(super) k: Expr,
    /// Grid layers (taps of a filter gradient, else 1).
    pub(super) layers: usize,
    pub(super) a: Loader<'a>,
    pub(super) b: Loader<'a>,
    /// The output buffer and the flat index of `C[row, col]` in layer `z`.
    pub(super) y: Buffer,
    pub(super) out: &'a dyn Fn(&Expr, &Expr, &Expr) -> Expr,
}

/// Loads a `rows x cols` tile (`cols` fastest across threads) into `tile`
/// stored as `tile[col * rows + row]` when `transpose`, else `tile[row * cols + col]`.
#[allow(clippy::too_many_arguments)]
fn load_tile(
    b: &mut KernelBuilder,
    tile: crate::cuda::builder::Shared,
    tid: &Expr,
    (rows, cols): (usize, usize),
    (row0, col0): (&Expr, &Expr),
    (row_end, col_end): (&Expr, &Expr),
    z: &Expr,
    load: Loader,
    transpose: bool,
) {
    for pass in 0..(rows * cols).div_ceil(GEMM_THREADS) {
        let e = b.let_("e", tid + int(pass * GEMM_THREADS));
        let r = b.let_("tr", &e / int(cols));
        let c = b.let_("tc", &e % int(cols));
        let row = b.let_("row", row0 + &r);
        let col = b.let_("col", col0 + &c);
        let v = b.let_("v", 0.0f32);
        b.if_(row.lt(row_end).and(col.lt(col_end)), |b| {
            let value = load(b, &row, &col, z);
            b.assign(&v, value);
        });
        let slot = if transpose {
            c * int(rows) + r
        } else {
            r * int(cols) + c
        };
        b.store(tile.mem(), slot, v);
    }
}

/// Emits the GEMM template into `l`.
pub(super) fn emit(l: &mut Lowering, g: Gemm) {
    emit_with(l, g, &|_, _, value| value)
}

/// Maps an accumulated `C[row, col]` to the value stored, given the builder
/// and the column.
pub(super) type Epilogue<'a> = &'a dyn Fn(&mut KernelBuilder, &Expr, Expr) -> Expr;

/// Adds `bias[col]` to the accumulated value, then rectifies when `relu`:
/// the epilogue of a conv with a folded batch norm.
pub(super) fn bias_epilogue(
    bias: Buffer,
    relu: bool,
) -> impl Fn(&mut KernelBuilder, &Expr, Expr) -> Expr {
    move |_, col, value| {
        let sum = value + bias.load(col);
        if relu {
            sum.max(0.0f32)
        } else {
            sum
        }
    }
}

/// Emits the GEMM template into `l`, storing `epilogue(C[row, col])`.
pub(super) fn emit_with(l: &mut Lowering, g: Gemm, epilogue: Epilogue) {
    l.grid(
        ceil_div(g.m.clone(), TILE_M),
        ceil_div(g.n.clone(), TILE_N),
        int(g.layers),
    );
    let a_tile = l.shared("a_tile", TILE_K * TILE_M);
    let b_tile = l.shared("b_tile", TILE_K * TILE_N);
    let b = &mut **l;
    let tid = b.let_("tid", thread_idx(Axis::X));
    let tx = b.let_("tx", &tid % int(SIDE));
    let ty = b.let_("ty", &tid / int(SIDE));
    let m0 = b.let_("m0", block_idx(Axis::X) * int(TILE_M));
    let n0 = b.let_("n0", block_idx(Axis::Y) * int(TILE_N));
    let z = b.let_("z", block_idx(Axis::Z));
    let acc: Vec<Vec<Expr>> = (0..MICRO)
        .map(|i| {
            (0..MICRO)
                .map(|j| b.let_(&format!("acc{i}{j}"), 0.0f32))
                .collect()
        })
        .collect();

    b.for_("k0", 0, g.k.clone(), int(TILE_K), |b, k0| {
        b.comment(format!(
            "Stage A[m0 .. m0 + {TILE_M}, k0 .. k0 + {TILE_K}] as a_tile[k][m]."
        ));
        let k_end = g.k.clone();
        load_tile(
            b,
            a_tile,
            &tid,
            (TILE_M, TILE_K),
            (&m0, &k0),
            (&g.m, &k_end),
            &z,
            g.a,
            true,
        );
        b.comment(format!(
            "Stage B[k0 .. k0 + {TILE_K}, n0 .. n0 + {TILE_N}] as b_tile[k][n]."
        ));
        load_tile(
            b,
            b_tile,
            &tid,
            (TILE_K, TILE_N),
            (&k0, &n0),
            (&k_end, &g.n),
            &z,
            g.b,
            false,
        );
        b.barrier();
        b.for_("kk", 0, int(TILE_K), 1, |b, kk| {
            let a: Vec<Expr> = (0..MICRO)
                .map(|i| {
                    b.let_(
                        &format!("a{i}"),
                        a_tile.load(&kk * int(TILE_M) + &ty + int(i * SIDE)),
                    )
                })
                .collect();
            let bv: Vec<Expr> = (0..MICRO)
                .map(|j| {
                    b.let_(
                        &format!("b{j}"),
                        b_tile.load(&kk * int(TILE_N) + &tx + int(j * SIDE)),
                    )
                })
                .collect();
            for i in 0..MICRO {
                for j in 0..MICRO {
                    b.assign(&acc[i][j], &acc[i][j] + &a[i] * &bv[j]);
                }
            }
        });
        // The next chunk overwrites the tiles only after every thread used them.
        b.barrier();
    });

    for (i, row_acc) in acc.iter().enumerate() {
        for (j, value) in row_acc.iter().enumerate() {
            let row = &m0 + &ty + int(i * SIDE);
            let col = &n0 + &tx + int(j * SIDE);
            let out = (g.out)(&row, &col, &z);
            b.if_(row.lt(&g.m).and(col.lt(&g.n)), |b| {
                let value = epilogue(b, &col, value.clone());
                b.store(g.y.mem(), out, value)
            });
        }
    }
}

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let channels = |t: &TensorType| t.channels();
    let launch = match *op {
        Op::Conv2d { k, stride, pad } => {
            let g = Geometry::new(op, inputs[0], out, (k, stride, pad))?;
            conv2d(g, channels(inputs[0]), channels(out), None)?
        }
        Op::Conv2dBias {
            k,
            stride,
            pad,
            relu,
        } => {
            let g = Geometry::new(op, inputs[0], out, (k, stride, pad))?;
            conv2d(g, channels(inputs[0]), channels(out), Some(relu))?
        }
        Op::Conv2dBackwardData { k, stride, pad, .. } => {
            let g = Geometry::new(op, out, inputs[0], (k, stride, pad))?;
            conv2d_backward_data(g, channels(out), channels(inputs[0]))?
        }
        Op::Conv2dBackwardFilter { k, stride, pad } => {
            let g = Geometry::new(op, inputs[0], inputs[1], (k, stride, pad))?;
            conv2d_backward_filter(g, channels(inputs[0]), channels(inputs[1]))?
        }
        Op::ConvTranspose2d { k, stride, pad, .. } => {
            let g = Geometry::new(op, out, inputs[0], (k, stride, pad))?;
            conv_transpose2d(g, channels(inputs[0]), channels(out))?
        }
        Op::ConvTranspose2dBackwardData { k, stride, pad } => {
            let g = Geometry::new(op, inputs[0], out, (k, stride, pad))?;
            conv_transpose2d_backward_data(g, channels(out), channels(inputs[0]))?
        }
        Op::ConvTranspose2dBackwardFilter { k, stride, pad } => {
            let g = Geometry::new(op, inputs[1], inputs[0], (k, stride, pad))?;
            conv_transpose2d_backward_filter(g, channels(inputs[0]), channels(inputs[1]))?
        }
        _ => return Err(unsupported(op, "not a convolution")),
    };
    Ok(LoweredStep::single(launch))
}

pub(super) fn describe(name: &str, g: &Geometry, cin: usize, cout: usize) -> String {
    format!(
        "{name}: {k}x{k} window, stride {s}, padding {p}, {cin} -> {cout} channels, big side \
         {bh}x{bw}, small side {sh}x{sw}. Implicit GEMM with {TILE_M}x{TILE_N} tiles of C per \
         block of {GEMM_THREADS} threads (4x4 outputs each) and K chunks of {TILE_K} in shared \
         memory; grid (ceil(M / {TILE_M}), ceil(N / {TILE_N}), layers).",
        k = g.k,
        s = g.stride,
        p = g.pad,
        bh = g.bh,
        bw = g.bw,
        sh = g.sh,
        sw = g.sw
    )
}

/// `y = x * w`, or with `bias = Some(relu)` the folded conv
/// `y = x * w + b`, rectified when `relu`.
fn conv2d(g: Geometry, cin: usize, cout: usize, bias: Option<bool>) -> Result<super::Launch> {
    let name = if bias.is_some() {
        "conv2d_bias"
    } else {
        "conv2d"
    };
    let mut l = Lowering::new(name, GEMM_THREADS as u32);
    let what = match bias {
        None => "Convolution y = x * w",
        Some(false) => "Convolution with bias y = x * w + b",
        Some(true) => "Convolution with bias and ReLU y = max(x * w + b, 0)",
    };
    l.doc(describe(what, &g, cin, cout));
    let x = l.operand("x", 0);
    let w = l.operand("w", 1);
    let epilogue = bias.map(|relu| bias_epilogue(l.operand("b", 2), relu));
    let y = l.result("y");
    let n = l.batch();
    let a = |b: &mut KernelBuilder, s: &Expr, kk: &Expr, _: &Expr| {
        let tap = b.let_("tap", kk / int(cin));
        let ci = b.let_("ci", kk % int(cin));
        g.big_at_small(b, x, cin, s, &tap, &ci)
    };
    let bl = |_: &mut KernelBuilder, kk: &Expr, co: &Expr, _: &Expr| w.load(kk * int(cout) + co);
    let out = |row: &Expr, col: &Expr, _: &Expr| row * int(cout) + col;
    let gemm = Gemm {
        m: n * int(g.sh * g.sw),
        n: int(cout),
        k: int(g.taps() * cin),
        layers: 1,
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    match &epilogue {
        Some(epilogue) => emit_with(&mut l, gemm, epilogue),
        None => emit(&mut l, gemm),
    }
    l.finish()
}

fn conv2d_backward_data(g: Geometry, cin: usize, cout: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("conv2d_backward_data", GEMM_THREADS as u32);
    l.doc(describe(
        "Convolution input gradient dx = dy * w^T",
        &g,
        cin,
        cout,
    ));
    let dy = l.operand("dy", 0);
    let w = l.operand("w", 1);
    let y = l.result("dx");
    let n = l.batch();
    let a = |b: &mut KernelBuilder, p: &Expr, kk: &Expr, _: &Expr| {
        let tap = b.let_("tap", kk / int(cout));
        let co = b.let_("co", kk % int(cout));
        g.small_at_big(b, dy, cout, p, &tap, &co)
    };
    let bl = |_: &mut KernelBuilder, kk: &Expr, ci: &Expr, _: &Expr| {
        w.load(((kk / int(cout)) * int(cin) + ci) * int(cout) + kk % int(cout))
    };
    let out = |row: &Expr, col: &Expr, _: &Expr| row * int(cin) + col;
    let gemm = Gemm {
        m: n * int(g.bh * g.bw),
        n: int(cin),
        k: int(g.taps() * cout),
        layers: 1,
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}

// TODO: the filter gradients launch only ceil(cin / 64) x ceil(cout / 64) x
// taps blocks, each reducing the whole batch, which leaves most of a large
// GPU idle; a split over K with a fixed-order second pass would keep them
// deterministic.
fn conv2d_backward_filter(g: Geometry, cin: usize, cout: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("conv2d_backward_filter", GEMM_THREADS as u32);
    l.doc(describe(
        "Convolution weight gradient dw[tap] = x_tap^T dy",
        &g,
        cin,
        cout,
    ));
    let x = l.operand("x", 0);
    let dy = l.operand("dy", 1);
    let y = l.result("dw");
    let n = l.batch();
    let a =
        |b: &mut KernelBuilder, ci: &Expr, s: &Expr, z: &Expr| g.big_at_small(b, x, cin, s, z, ci);
    let bl = |_: &mut KernelBuilder, s: &Expr, co: &Expr, _: &Expr| dy.load(s * int(cout) + co);
    let out = |row: &Expr, col: &Expr, z: &Expr| (z * int(cin) + row) * int(cout) + col;
    let gemm = Gemm {
        m: int(cin),
        n: int(cout),
        k: n * int(g.sh * g.sw),
        layers: g.taps(),
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}

fn conv_transpose2d(g: Geometry, cin: usize, cout: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("conv_transpose2d", GEMM_THREADS as u32);
    l.doc(describe("Transposed convolution", &g, cin, cout));
    let x = l.operand("x", 0);
    let w = l.operand("w", 1);
    let y = l.result("y");
    let n = l.batch();
    let a = |b: &mut KernelBuilder, p: &Expr, kk: &Expr, _: &Expr| {
        let tap = b.let_("tap", kk / int(cin));
        let ci = b.let_("ci", kk % int(cin));
        g.small_at_big(b, x, cin, p, &tap, &ci)
    };
    let bl = |_: &mut KernelBuilder, kk: &Expr, co: &Expr, _: &Expr| w.load(kk * int(cout) + co);
    let out = |row: &Expr, col: &Expr, _: &Expr| row * int(cout) + col;
    let gemm = Gemm {
        m: n * int(g.bh * g.bw),
        n: int(cout),
        k: int(g.taps() * cin),
        layers: 1,
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}

fn conv_transpose2d_backward_data(g: Geometry, cin: usize, cout: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("conv_transpose2d_backward_data", GEMM_THREADS as u32);
    l.doc(describe(
        "Transposed-convolution input gradient",
        &g,
        cin,
        cout,
    ));
    let dy = l.operand("dy", 0);
    let w = l.operand("w", 1);
    let y = l.result("dx");
    let n = l.batch();
    let a = |b: &mut KernelBuilder, s: &Expr, kk: &Expr, _: &Expr| {
        let tap = b.let_("tap", kk / int(cout));
        let co = b.let_("co", kk % int(cout));
        g.big_at_small(b, dy, cout, s, &tap, &co)
    };
    let bl = |_: &mut KernelBuilder, kk: &Expr, ci: &Expr, _: &Expr| {
        w.load(((kk / int(cout)) * int(cin) + ci) * int(cout) + kk % int(cout))
    };
    let out = |row: &Expr, col: &Expr, _: &Expr| row * int(cin) + col;
    let gemm = Gemm {
        m: n * int(g.sh * g.sw),
        n: int(cin),
        k: int(g.taps() * cout),
        layers: 1,
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}

fn conv_transpose2d_backward_filter(g: Geometry, cin: usize, cout: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("conv_transpose2d_backward_filter", GEMM_THREADS as u32);
    l.doc(describe(
        "Transposed-convolution weight gradient dw[tap] = x^T dy_tap",
        &g,
        cin,
        cout,
    ));
    let x = l.operand("x", 0);
    let dy = l.operand("dy", 1);
    let y = l.result("dw");
    let n = l.batch();
    let a = |_: &mut KernelBuilder, ci: &Expr, s: &Expr, _: &Expr| x.load(s * int(cin) + ci);
    let bl = |b: &mut KernelBuilder, s: &Expr, co: &Expr, z: &Expr| {
        g.big_at_small(b, dy, cout, s, z, co)
    };
    let out = |row: &Expr, col: &Expr, z: &Expr| (z * int(cin) + row) * int(cout) + col;
    let gemm = Gemm {
        m: int(cin),
        n: int(cout),
        k: n * int(g.sh * g.sw),
        layers: g.taps(),
        a: &a,
        b: &bl,
        y,
        out: &out,
    };
    emit(&mut l, gemm);
    l.finish()
}
