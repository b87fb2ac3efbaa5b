//! Prints kernel IR as CUDA C: one `extern "C" __global__` function per
//! kernel, preceded by a comment with what it computes and its launch shape.
//!
//! Expressions are printed with the fewest parentheses C's precedence rules
//! allow. CUDA's index variables are unsigned, so they are printed with an
//! `(int)` cast: the kernel IR treats them as `int`, and a subtraction that
//! goes below zero must stay signed as it does in the interpreter.

use std::fmt::Write;

use super::kernel::{BinOp, Expr, Kernel, Mem, ParamKind, Special, Stmt, Ty, UnOp};
use super::validate::type_of;

/// C precedence of the top of an expression, higher binding tighter.
const PREC_TERNARY: u8 = 3;
const PREC_UNARY: u8 = 15;
const PREC_ATOM: u8 = 16;

fn binary_prec(op: BinOp) -> u8 {
    match op {
        BinOp::Mul | BinOp::Div | BinOp::Rem => 13,
        BinOp::Add | BinOp::Sub => 12,
        BinOp::Shr => 11,
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 10,
        BinOp::Eq | BinOp::Ne => 9,
        BinOp::Xor => 7,
        BinOp::And => 5,
        BinOp::Or => 4,
        BinOp::Min | BinOp::Max => PREC_ATOM,
    }
}

fn binary_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::And => "&&",
        BinOp::Or => "||",
        BinOp::Shr => ">>",
        BinOp::Xor => "^",
        BinOp::Min => "min",
        BinOp::Max => "max",
    }
}

/// A float literal that reads back as the same f32.
fn float_literal(v: f32) -> (String, u8) {
    if v.is_nan() {
        ("__int_as_float(0x7fc00000)".into(), PREC_ATOM)
    } else if v.is_infinite() {
        let inf = "__int_as_float(0x7f800000)";
        if v > 0.0 {
            (inf.into(), PREC_ATOM)
        } else {
            (format!("-{inf}"), PREC_UNARY)
        }
    } else {
        // Debug formatting is the shortest text that parses back to `v`.
        let text = format!("{v:?}f");
        let prec = if v.is_sign_negative() {
            PREC_UNARY
        } else {
            PREC_ATOM
        };
        (text, prec)
    }
}

struct Printer<'a> {
    kernel: &'a Kernel,
    out: String,
    indent: usize,
}

impl Printer<'_> {
    fn mem_name(&self, mem: Mem) -> &str {
        match mem {
            Mem::Global(i) => &self.kernel.params[i].name,
            Mem::Shared(i) => &self.kernel.shared[i].name,
        }
    }

    fn ty(&self, e: &Expr) -> Ty {
        // Printing follows validation, so every expression has a type.
        type_of(e, &self.kernel.params, &self.kernel.vars).unwrap_or(Ty::F32)
    }

    /// `e` as text, in parentheses when its precedence is below `min`.
    fn operand(&self, e: &Expr, min: u8) -> String {
        let (text, prec) = self.expr(e);
        if prec < min {
            format!("({text})")
        } else {
            text
        }
    }

    fn expr(&self, e: &Expr) -> (String, u8) {
        match e {
            Expr::I32(v) if *v < 0 => (v.to_string(), PREC_UNARY),
            Expr::I32(v) => (v.to_string(), PREC_ATOM),
            Expr::U64(v) => (format!("0x{v:X}ull"), PREC_ATOM),
            Expr::F32(v) => float_literal(*v),
            Expr::Bool(v) => (v.to_string(), PREC_ATOM),
            Expr::Param(i) => (self.kernel.params[*i].name.clone(), PREC_ATOM),
            Expr::Var(v) => (self.kernel.vars[v.0 as usize].name.clone(), PREC_ATOM),
            Expr::Special(s) => {
                let (var, axis) = match s {
                    Special::ThreadIdx(a) => ("threadIdx", a),
                    Special::BlockIdx(a) => ("blockIdx", a),
                    Special::BlockDim(a) => ("blockDim", a),
                    Special::GridDim(a) => ("gridDim", a),
                };
                (format!("(int){var}.{}", axis.name()), PREC_UNARY)
            }
            Expr::Unary(op, a) => {
                let call = |f: &str| (format!("{f}({})", self.expr(a).0), PREC_ATOM);
                match op {
                    UnOp::Neg => (format!("-{}", self.operand(a, PREC_UNARY)), PREC_UNARY),
                    UnOp::Not => (format!("!{}", self.operand(a, PREC_UNARY)), PREC_UNARY),
                    UnOp::Exp => call("expf"),
                    UnOp::Log => call("logf"),
                    UnOp::Sqrt => call("sqrtf"),
                    UnOp::Rsqrt => call("rsqrtf"),
                }
            }
            Expr::Binary(op @ (BinOp::Min | BinOp::Max), a, b) => {
                let f = match (op, self.ty(a)) {
                    (BinOp::Min, Ty::F32) => "fminf",
                    (BinOp::Max, Ty::F32) => "fmaxf",
                    _ => binary_symbol(*op),
                };
                (
                    format!("{f}({}, {})", self.expr(a).0, self.expr(b).0),
                    PREC_ATOM,
                )
            }
            Expr::Binary(op, a, b) => {
                let p = binary_prec(*op);
                // Left-associative: the right operand needs parentheses at equal precedence.
                let text = format!(
                    "{} {} {}",
                    self.operand(a, p),
                    binary_symbol(*op),
                    self.operand(b, p + 1)
                );
                (text, p)
            }
            Expr::Select(c, a, b) => {
                let text = format!(
                    "{} ? {} : {}",
                    self.operand(c, PREC_TERNARY + 1),
                    self.operand(a, PREC_TERNARY + 1),
                    self.operand(b, PREC_TERNARY)
                );
                (text, PREC_TERNARY)
            }
            Expr::Cast(ty, a) => (
                format!("({}){}", ty.c_name(), self.operand(a, PREC_UNARY)),
                PREC_UNARY,
            ),
            Expr::Load(mem, i) => (
                format!("{}[{}]", self.mem_name(*mem), self.expr(i).0),
                PREC_ATOM,
            ),
        }
    }

    fn line(&mut self, text: &str) {
        for _ in 0..self.indent {
            self.out.push_str("    ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn block(&mut self, stmts: &[Stmt]) {
        self.indent += 1;
        for s in stmts {
            self.stmt(s);
        }
        self.indent -= 1;
    }

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Let { var, init } => {
                let decl = &self.kernel.vars[var.0 as usize];
                let text = format!(
                    "{} {} = {};",
                    decl.ty.c_name(),
                    decl.name,
                    self.expr(init).0
                );
                self.line(&text);
            }
            Stmt::Assign { var, value } => {
                let name = &self.kernel.vars[var.0 as usize].name;
                let text = match value {
                    Expr::Binary(BinOp::Add, a, b) if **a == Expr::Var(*var) => {
                        format!("{name} += {};", self.expr(b).0)
                    }
                    _ => format!("{name} = {};", self.expr(value).0),
                };
                self.line(&text);
            }
            Stmt::Store { mem, index, value } => {
                let text = format!(
                    "{}[{}] = {};",
                    self.mem_name(*mem),
                    self.expr(index).0,
                    self.expr(value).0
                );
                self.line(&text);
            }
            Stmt::AtomicAdd { mem, index, value } => {
                let text = format!(
                    "atomicAdd(&{}[{}], {});",
                    self.mem_name(*mem),
                    self.expr(index).0,
                    self.expr(value).0
                );
                self.line(&text);
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                let name = &self.kernel.vars[var.0 as usize].name;
                let step = match step {
                    Expr::I32(1) => format!("++{name}"),
                    _ => format!("{name} += {}", self.expr(step).0),
                };
                let text = format!(
                    "for (int {name} = {}; {name} < {}; {step}) {{",
                    self.expr(start).0,
                    self.operand(end, 11)
                );
                self.line(&text);
                self.block(body);
                self.line("}");
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let text = format!("if ({}) {{", self.expr(cond).0);
                self.line(&text);
                self.block(then);
                if !otherwise.is_empty() {
                    self.line("} else {");
                    self.block(otherwise);
                }
                self.line("}");
            }
            Stmt::Barrier => self.line("__syncthreads();"),
            Stmt::ShflDown { var, value, offset } => {
                let text = format!(
                    "{} = __shfl_down_sync(0xffffffffu, {}, {});",
                    self.kernel.vars[var.0 as usize].name,
                    self.expr(value).0,
                    self.expr(offset).0
                );
                self.line(&text);
            }
            Stmt::Comment(text) => self.line(&format!("// {text}")),
        }
    }

    fn signature(&self) -> String {
        let params: Vec<String> = self
            .kernel
            .params
            .iter()
            .map(|p| match p.kind {
                ParamKind::Buffer { writes: false } => {
                    format!("const float* __restrict__ {}", p.name)
                }
                ParamKind::Buffer { writes: true } => format!("float* __restrict__ {}", p.name),
                ParamKind::I32 => format!("int {}", p.name),
                ParamKind::U64 => format!("unsigned long long {}", p.name),
                ParamKind::F32 => format!("float {}", p.name),
            })
            .collect();
        let head = format!(
            "extern \"C\" __global__ void __launch_bounds__({}) {}(",
            self.kernel.threads_per_block(),
            self.kernel.name
        );
        let one_line = format!("{head}{}) {{", params.join(", "));
        if one_line.len() <= 100 {
            one_line
        } else {
            format!("{head}\n    {}) {{", params.join(",\n    "))
        }
    }

    fn header(&mut self) {
        for line in wrap(&self.kernel.doc, 96) {
            self.line(&format!("// {line}"));
        }
        let [bx, by, bz] = self.kernel.block;
        let grid: Vec<String> = self.kernel.grid.iter().map(|g| self.expr(g).0).collect();
        let launch = format!(
            "// Launch: grid ({}), block ({bx}, {by}, {bz}), {} bytes of static shared memory.",
            grid.join(", "),
            self.kernel.shared_bytes()
        );
        self.line(&launch);
    }
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        if !current.is_empty() && current.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// Prints one kernel as a self-contained CUDA C translation unit.
pub fn print_kernel(kernel: &Kernel) -> String {
    let mut p = Printer {
        kernel,
        out: String::new(),
        indent: 0,
    };
    p.header();
    let signature = p.signature();
    p.line(&signature);
    p.indent = 1;
    for s in &kernel.shared {
        let text = format!("__shared__ float {}[{}];", s.name, s.len);
        p.line(&text);
    }
    p.indent = 0;
    p.block(&kernel.body);
    p.line("}");
    p.out
}

/// Prints several kernels as one translation unit.
pub fn print_module(kernels: &[&Kernel]) -> String {
    let mut out = String::new();
    for (i, k) in kernels.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = write!(out, "{}", print_kernel(k));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::builder::KernelBuilder;
    use super::super::kernel::{ceil_div, Axis};
    use super::*;

    /// Prints `kernel` and compares it with `expected` line by line.
    fn check(kernel: &Kernel, expected: &str) {
        let actual = print_kernel(kernel);
        assert_eq!(actual.trim_end(), expected.trim(), "printed:\n{actual}");
    }

    #[test]
    fn scale_kernel_text() {
        let mut b = KernelBuilder::new("scale", [256, 1, 1]);
        b.doc("y = 2 * x, one thread per element.");
        let x = b.input("x");
        let y = b.output("y");
        let n = b.int_param("n");
        b.grid(ceil_div(&n * 12, 256), 1, 1);
        let i = b.global_thread_x();
        b.if_(i.lt(&n * 12), |b| b.store(y.mem(), &i, x.load(&i) * 2.0f32));
        let kernel = b.finish().expect("valid kernel");
        check(
            &kernel,
            r#"
// y = 2 * x, one thread per element.
// Launch: grid ((n * 12 + 255) / 256, 1, 1), block (256, 1, 1), 0 bytes of static shared memory.
extern "C" __global__ void __launch_bounds__(256) scale(
    const float* __restrict__ x,
    float* __restrict__ y,
    int n) {
    int i = (int)blockIdx.x * (int)blockDim.x + (int)threadIdx.x;
    if (i < n * 12) {
        y[i] = x[i] * 2.0f;
    }
}"#,
        );
    }

    #[test]
    fn reduction_kernel_text() {
        let mut b = KernelBuilder::new("block_sum", [64, 1, 1]);
        b.doc("Sums 64 values with a shared-memory tree and a warp shuffle.");
        let x = b.input("x");
        let y = b.output("y");
        let partial = b.shared("partial", 64);
        let tid = b.let_("tid", super::super::kernel::thread_idx(Axis::X));
        b.store(partial.mem(), &tid, x.load(&tid));
        b.barrier();
        b.if_(tid.lt(32), |b| {
            let v = b.let_("v", partial.load(&tid) + partial.load(&tid + 32));
            b.shfl_down(&v, &v, 16);
            b.if_(tid.equals(0), |b| b.store(y.mem(), 0, &v));
        });
        let kernel = b.finish().expect("valid kernel");
        check(
            &kernel,
            r#"
// Sums 64 values with a shared-memory tree and a warp shuffle.
// Launch: grid (1, 1, 1), block (64, 1, 1), 256 bytes of static shared memory.
extern "C" __global__ void __launch_bounds__(64) block_sum(
    const float* __restrict__ x,
    float* __restrict__ y) {
    __shared__ float partial[64];
    int tid = (int)threadIdx.x;
    partial[tid] = x[tid];
    __syncthreads();
    if (tid < 32) {
        float v = partial[tid] + partial[tid + 32];
        v = __shfl_down_sync(0xffffffffu, v, 16);
        if (tid == 0) {
            y[0] = v;
        }
    }
}"#,
        );
    }

    #[test]
    fn precedence_keeps_needed_parentheses() {
        let mut b = KernelBuilder::new("prec", [32, 1, 1]);
        let y = b.output("y");
        let a = b.let_("a", 7);
        let c = b.let_("c", 3);
        b.store(
            y.mem(),
            (&a - (&c - 1)) * (&a + &c) % 5,
            (-a.to_f32()).exp(),
        );
        let kernel = b.finish().expect("valid kernel");
        let text = print_kernel(&kernel);
        assert!(
            text.contains("y[(a - (c - 1)) * (a + c) % 5] = expf(-(float)a);"),
            "{text}"
        );
    }

    #[test]
    fn float_literals_round_trip() {
        assert_eq!(float_literal(0.1).0, "0.1f");
        assert_eq!(float_literal(1e-5).0, "1e-5f");
        assert_eq!(
            float_literal(f32::NEG_INFINITY).0,
            "-__int_as_float(0x7f800000)"
        );
    }
}
