//! Runs kernel IR on the CPU with CUDA's execution model, for tests on small
//! shapes.
//!
//! Blocks run one after another. Inside a block, all threads execute the
//! structured IR statement by statement in lockstep. A statement runs for
//! every active thread before the next starts, an `if` runs its branches
//! with the matching subsets of threads, and a loop runs while any thread is
//! still in it. This is a valid schedule of a CUDA block because the
//! validator only admits `__syncthreads()` at block-uniform points, so every
//! barrier sees all threads arrive together. Warps are 32 consecutive linear
//! thread ids (CUDA C Programming Guide, "SIMT Architecture"), and
//! `__shfl_down_sync` with a full mask must find all 32 lanes active.
//!
//! Undefined behaviour in CUDA C is an error here: every global and shared
//! access is bounds-checked, `int` arithmetic that overflows is reported, as
//! are division by zero and float-to-int casts out of range. Errors name the
//! kernel, the block and the thread, and for accesses the array and index.

use super::kernel::{Axis, BinOp, Expr, Kernel, Mem, ParamKind, Special, Stmt, Ty, UnOp};
use super::lower::{Binding, LoweredStep};
use super::validate::validate;
use super::{Error, Result};

/// Threads per warp on every CUDA architecture to date.
pub const WARP_SIZE: usize = 32;

/// A kernel argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Buffer(Vec<f32>),
    I32(i32),
    U64(u64),
    F32(f32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    /// An `int`, held wider so that overflow can be detected.
    I(i64),
    U(u64),
    F(f32),
    B(bool),
}

impl Value {
    fn int(self) -> i64 {
        match self {
            Value::I(v) => v,
            _ => unreachable!("the validator types every int operand"),
        }
    }
    fn float(self) -> f32 {
        match self {
            Value::F(v) => v,
            _ => unreachable!("the validator types every float operand"),
        }
    }
    fn boolean(self) -> bool {
        match self {
            Value::B(v) => v,
            _ => unreachable!("the validator types every condition as bool"),
        }
    }
}

/// An error inside a block, at one thread.
struct Fault {
    thread: usize,
    message: String,
}

type Exec<T> = std::result::Result<T, Fault>;

struct Block<'a> {
    kernel: &'a Kernel,
    args: &'a mut [Arg],
    shared: Vec<Vec<f32>>,
    /// Registers of all threads, `threads * vars` values.
    regs: Vec<Value>,
    vars: usize,
    threads: usize,
    block_idx: [u32; 3],
    grid: [u32; 3],
}

impl Block<'_> {
    fn thread_coord(&self, t: usize) -> [u32; 3] {
        let [bx, by, _] = self.kernel.block.map(|d| d as usize);
        [
            (t % bx) as u32,
            ((t / bx) % by) as u32,
            (t / (bx * by)) as u32,
        ]
    }

    fn fault<T>(&self, t: usize, message: String) -> Exec<T> {
        Err(Fault { thread: t, message })
    }

    fn mem_name(&self, mem: Mem) -> String {
        match mem {
            Mem::Global(i) => format!("global buffer `{}`", self.kernel.params[i].name),
            Mem::Shared(i) => format!("shared array `{}`", self.kernel.shared[i].name),
        }
    }

    fn slot(&self, t: usize, mem: Mem, index: i64) -> Exec<usize> {
        let len = match mem {
            Mem::Global(i) => match &self.args[i] {
                Arg::Buffer(b) => b.len(),
                _ => unreachable!("launch checks that buffer parameters get buffers"),
            },
            Mem::Shared(i) => self.shared[i].len(),
        };
        if index < 0 || index as usize >= len {
            return self.fault(
                t,
                format!(
                    "{} index {index} is out of bounds for length {len}",
                    self.mem_name(mem)
                ),
            );
        }
        Ok(index as usize)
    }

    fn read(&self, t: usize, mem: Mem, index: i64) -> Exec<f32> {
        let i = self.slot(t, mem, index)?;
        Ok(match mem {
            Mem::Global(p) => match &self.args[p] {
                Arg::Buffer(b) => b[i],
                _ => unreachable!("launch checks that buffer parameters get buffers"),
            },
            Mem::Shared(s) => self.shared[s][i],
        })
    }

    fn write(&mut self, t: usize, mem: Mem, index: i64, value: f32, add: bool) -> Exec<()> {
        let i = self.slot(t, mem, index)?;
        let cell = match mem {
            Mem::Global(p) => match &mut self.args[p] {
                Arg::Buffer(b) => &mut b[i],
                _ => unreachable!("launch checks that buffer parameters get buffers"),
            },
            Mem::Shared(s) => &mut self.shared[s][i],
        };
        *cell = if add { *cell + value } else { value };
        Ok(())
    }

    fn int_result(&self, t: usize, v: i64, what: &str) -> Exec<Value> {
        if v < i32::MIN as i64 || v > i32::MAX as i64 {
            return self.fault(
                t,
                format!("int overflow: {what} = {v} does not fit in an int"),
            );
        }
        Ok(Value::I(v))
    }

    fn eval(&self, t: usize, e: &Expr) -> Exec<Value> {
        Ok(match e {
            Expr::I32(v) => Value::I(*v as i64),
            Expr::U64(v) => Value::U(*v),
            Expr::F32(v) => Value::F(*v),
            Expr::Bool(v) => Value::B(*v),
            Expr::Param(i) => match &self.args[*i] {
                Arg::I32(v) => Value::I(*v as i64),
                Arg::U64(v) => Value::U(*v),
                Arg::F32(v) => Value::F(*v),
                Arg::Buffer(_) => unreachable!("the validator rejects buffers used as scalars"),
            },
            Expr::Var(v) => self.regs[t * self.vars + v.0 as usize],
            Expr::Special(s) => {
                let pick = |d: [u32; 3], a: &Axis| Value::I(d[a.index()] as i64);
                match s {
                    Special::ThreadIdx(a) => pick(self.thread_coord(t), a),
                    Special::BlockIdx(a) => pick(self.block_idx, a),
                    Special::BlockDim(a) => pick(self.kernel.block, a),
                    Special::GridDim(a) => pick(self.grid, a),
                }
            }
            Expr::Unary(op, a) => self.unary(t, *op, self.eval(t, a)?)?,
            Expr::Binary(BinOp::And, a, b) => {
                Value::B(self.eval(t, a)?.boolean() && self.eval(t, b)?.boolean())
            }
            Expr::Binary(BinOp::Or, a, b) => {
                Value::B(self.eval(t, a)?.boolean() || self.eval(t, b)?.boolean())
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.eval(t, a)?, self.eval(t, b)?);
                self.binary(t, *op, a, b)?
            }
            Expr::Select(c, a, b) => {
                if self.eval(t, c)?.boolean() {
                    self.eval(t, a)?
                } else {
                    self.eval(t, b)?
                }
            }
            Expr::Cast(ty, a) => self.cast(t, *ty, self.eval(t, a)?)?,
            Expr::Load(mem, i) => {
                let index = self.eval(t, i)?.int();
                Value::F(self.read(t, *mem, index)?)
            }
        })
    }

    fn unary(&self, t: usize, op: UnOp, a: Value) -> Exec<Value> {
        Ok(match (op, a) {
            (UnOp::Neg, Value::I(v)) => self.int_result(t, -v, "negation")?,
            (UnOp::Neg, Value::F(v)) => Value::F(-v),
            (UnOp::Not, Value::B(v)) => Value::B(!v),
            (UnOp::Exp, Value::F(v)) => Value::F(v.exp()),
            (UnOp::Log, Value::F(v)) => Value::F(v.ln()),
            (UnOp::Sqrt, Value::F(v)) => Value::F(v.sqrt()),
            (UnOp::Rsqrt, Value::F(v)) => Value::F(1.0 / v.sqrt()),
            _ => unreachable!("the validator types every unary operand"),
        })
    }

    fn binary(&self, t: usize, op: BinOp, a: Value, b: Value) -> Exec<Value> {
        use BinOp::*;
        Ok(match (a, b) {
            (Value::I(x), Value::I(y)) => {
                let what = || format!("{x} {op:?} {y}");
                match op {
                    Add => self.int_result(t, x + y, &what())?,
                    Sub => self.int_result(t, x - y, &what())?,
                    Mul => self.int_result(t, x * y, &what())?,
                    Div | Rem if y == 0 => {
                        return self.fault(t, format!("int division by zero in {}", what()))
                    }
                    Div => self.int_result(t, x / y, &what())?,
                    Rem => Value::I(x % y),
                    Shr if !(0..32).contains(&y) => {
                        return self.fault(t, format!("shift by {y} is undefined for an int"))
                    }
                    Shr => Value::I(x >> y),
                    Min => Value::I(x.min(y)),
                    Max => Value::I(x.max(y)),
                    _ => compare(op, x, y),
                }
            }
            (Value::U(x), Value::U(y)) => match op {
                Add => Value::U(x.wrapping_add(y)),
                Sub => Value::U(x.wrapping_sub(y)),
                Mul => Value::U(x.wrapping_mul(y)),
                Div | Rem if y == 0 => return self.fault(t, "division by zero".into()),
                Div => Value::U(x / y),
                Rem => Value::U(x % y),
                Xor => Value::U(x ^ y),
                Min => Value::U(x.min(y)),
                Max => Value::U(x.max(y)),
                _ => compare(op, x, y),
            },
            (Value::U(x), Value::I(y)) if op == Shr => {
                if !(0..64).contains(&y) {
                    return self
                        .fault(t, format!("shift by {y} is undefined for a 64-bit integer"));
                }
                Value::U(x >> y)
            }
            (Value::F(x), Value::F(y)) => match op {
                Add => Value::F(x + y),
                Sub => Value::F(x - y),
                Mul => Value::F(x * y),
                Div => Value::F(x / y),
                // fminf and fmaxf return the other operand when one is NaN, as f32::min and max do.
                Min => Value::F(x.min(y)),
                Max => Value::F(x.max(y)),
                _ => compare_f(op, x, y),
            },
            _ => unreachable!("the validator types every binary operand"),
        })
    }

    fn cast(&self, t: usize, to: Ty, a: Value) -> Exec<Value> {
        Ok(match (a, to) {
            (Value::I(v), Ty::I32) => Value::I(v),
            (Value::I(v), Ty::F32) => Value::F(v as f32),
            // C converts a negative int to unsigned modulo 2^64, as Rust's `as` does.
            (Value::I(v), Ty::U64) => Value::U(v as u64),
            (Value::U(v), Ty::U64) => Value::U(v),
            (Value::U(v), Ty::F32) => Value::F(v as f32),
            (Value::U(v), Ty::I32) => Value::I(v as i32 as i64),
            (Value::F(v), Ty::F32) => Value::F(v),
            (Value::F(v), Ty::I32) => {
                if !(v > i32::MIN as f32 - 1.0 && v < i32::MAX as f32) {
                    return self.fault(t, format!("(int){v} is out of range (undefined in C)"));
                }
                Value::I(v.trunc() as i64)
            }
            (Value::F(v), Ty::U64) => {
                if !(v > -1.0 && v < u64::MAX as f32) {
                    return self.fault(t, format!("(unsigned long long){v} is out of range"));
                }
                Value::U(v.trunc() as u64)
            }
            _ => unreachable!("the validator rejects casts to and from bool"),
        })
    }

    fn set(&mut self, t: usize, var: super::kernel::VarId, v: Value) {
        self.regs[t * self.vars + var.0 as usize] = v;
    }

    fn exec(&mut self, stmts: &[Stmt], mask: &[bool]) -> Exec<()> {
        for s in stmts {
            self.stmt(s, mask)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt, mask: &[bool]) -> Exec<()> {
        let active = || (0..mask.len()).filter(|&t| mask[t]);
        match s {
            Stmt::Let { var, init: value } | Stmt::Assign { var, value } => {
                for t in active() {
                    let v = self.eval(t, value)?;
                    self.set(t, *var, v);
                }
            }
            Stmt::Store { mem, index, value } | Stmt::AtomicAdd { mem, index, value } => {
                let add = matches!(s, Stmt::AtomicAdd { .. });
                for t in active() {
                    let i = self.eval(t, index)?.int();
                    let v = self.eval(t, value)?.float();
                    self.write(t, *mem, i, v, add)?;
                }
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                let mut live = mask.to_vec();
                for t in active() {
                    let v = self.eval(t, start)?;
                    self.set(t, *var, v);
                }
                loop {
                    for (t, alive) in live.iter_mut().enumerate() {
                        if *alive {
                            let i = self.regs[t * self.vars + var.0 as usize].int();
                            *alive = i < self.eval(t, end)?.int();
                        }
                    }
                    if !live.contains(&true) {
                        break;
                    }
                    self.exec(body, &live)?;
                    for t in (0..live.len()).filter(|&t| live[t]) {
                        let by = self.eval(t, step)?.int();
                        if by <= 0 {
                            return self.fault(t, format!("loop step {by} is not positive"));
                        }
                        let next = self.regs[t * self.vars + var.0 as usize].int() + by;
                        let next = self.int_result(t, next, "loop increment")?;
                        self.set(t, *var, next);
                    }
                }
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let mut taken = vec![false; mask.len()];
                let mut skipped = vec![false; mask.len()];
                for t in active() {
                    if self.eval(t, cond)?.boolean() {
                        taken[t] = true;
                    } else {
                        skipped[t] = true;
                    }
                }
                if taken.contains(&true) {
                    self.exec(then, &taken)?;
                }
                if skipped.contains(&true) {
                    self.exec(otherwise, &skipped)?;
                }
            }
            Stmt::Barrier => {
                let arrived = active().count();
                if arrived != self.threads {
                    let first_missing = mask.iter().position(|a| !a).unwrap_or(0);
                    return self.fault(
                        first_missing,
                        format!(
                            "__syncthreads() reached by {arrived} of {} threads",
                            self.threads
                        ),
                    );
                }
            }
            Stmt::ShflDown { var, value, offset } => self.shuffle(*var, value, offset, mask)?,
            Stmt::Comment(_) => {}
        }
        Ok(())
    }

    fn shuffle(
        &mut self,
        var: super::kernel::VarId,
        value: &Expr,
        offset: &Expr,
        mask: &[bool],
    ) -> Exec<()> {
        let mut values = vec![0f32; self.threads];
        let mut offsets = vec![0i64; self.threads];
        for t in (0..self.threads).filter(|&t| mask[t]) {
            values[t] = self.eval(t, value)?.float();
            offsets[t] = self.eval(t, offset)?.int();
        }
        for warp_start in (0..self.threads).step_by(WARP_SIZE) {
            let lanes = warp_start..(warp_start + WARP_SIZE).min(self.threads);
            let active = lanes.clone().filter(|&t| mask[t]).count();
            if active == 0 {
                continue;
            }
            if active != WARP_SIZE {
                return self.fault(
                    warp_start,
                    format!(
                        "__shfl_down_sync with a full mask executed by {active} of the 32 lanes of warp {}",
                        warp_start / WARP_SIZE
                    ),
                );
            }
            for t in lanes {
                let lane = (t - warp_start) as i64;
                let source = lane + offsets[t];
                // A source lane past the warp returns the caller's own value.
                let v = if (0..WARP_SIZE as i64).contains(&source) {
                    values[warp_start + source as usize]
                } else {
                    values[t]
                };
                self.set(t, var, Value::F(v));
            }
        }
        Ok(())
    }
}

fn compare<T: PartialOrd>(op: BinOp, x: T, y: T) -> Value {
    Value::B(match op {
        BinOp::Lt => x < y,
        BinOp::Le => x <= y,
        BinOp::Gt => x > y,
        BinOp::Ge => x >= y,
        BinOp::Eq => x == y,
        BinOp::Ne => x != y,
        _ => unreachable!("the validator types arithmetic separately from comparisons"),
    })
}

fn compare_f(op: BinOp, x: f32, y: f32) -> Value {
    compare(op, x, y)
}

/// Checks the arguments against the parameters and evaluates the grid.
/// Only scalar arguments enter the grid, so an executor that launches on a
/// GPU may pass empty buffers.
pub fn launch_grid(kernel: &Kernel, args: &mut [Arg]) -> Result<[u32; 3]> {
    let fail = |message: String| Error::Launch {
        kernel: kernel.name.clone(),
        message,
    };
    if args.len() != kernel.params.len() {
        return Err(fail(format!(
            "{} arguments for {} parameters",
            args.len(),
            kernel.params.len()
        )));
    }
    for (p, a) in kernel.params.iter().zip(args.iter()) {
        let fits = matches!(
            (p.kind, a),
            (ParamKind::Buffer { .. }, Arg::Buffer(_))
                | (ParamKind::I32, Arg::I32(_))
                | (ParamKind::U64, Arg::U64(_))
                | (ParamKind::F32, Arg::F32(_))
        );
        if !fits {
            return Err(fail(format!(
                "argument for `{}` does not match {:?}",
                p.name, p.kind
            )));
        }
    }

    let probe = Block {
        kernel,
        args,
        shared: Vec::new(),
        regs: Vec::new(),
        vars: 0,
        threads: 1,
        block_idx: [0; 3],
        grid: [1; 3],
    };
    let mut grid = [0u32; 3];
    // Maximum blocks per grid dimension (CUDA C Programming Guide, "Compute Capabilities").
    let limits = [i32::MAX as i64, 65535, 65535];
    for axis in 0..3 {
        let g = match probe.eval(0, &kernel.grid[axis]) {
            Ok(v) => v.int(),
            Err(f) => return Err(fail(format!("grid dimension {axis}: {}", f.message))),
        };
        if g < 1 || g > limits[axis] {
            return Err(fail(format!(
                "grid dimension {axis} is {g}, outside 1..={}",
                limits[axis]
            )));
        }
        grid[axis] = g as u32;
    }
    Ok(grid)
}

/// Runs `kernel` over its whole grid with `args`, one per parameter.
pub fn run(kernel: &Kernel, args: &mut [Arg]) -> Result<()> {
    validate(kernel)?;
    let grid = launch_grid(kernel, args)?;
    let threads = kernel.threads_per_block() as usize;
    let vars = kernel.vars.len();
    let mut block = Block {
        kernel,
        args,
        shared: Vec::new(),
        regs: vec![Value::I(0); threads * vars],
        vars,
        threads,
        block_idx: [0; 3],
        grid,
    };
    let all = vec![true; threads];
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                block.block_idx = [bx, by, bz];
                // Shared memory starts out undefined; NaN makes a read before
                // a write show up in the results.
                block.shared = kernel
                    .shared
                    .iter()
                    .map(|s| vec![f32::NAN; s.len])
                    .collect();
                if let Err(fault) = block.exec(&kernel.body, &all) {
                    return Err(Error::Interp {
                        kernel: kernel.name.clone(),
                        block: block.block_idx,
                        thread: block.thread_coord(fault.thread),
                        message: fault.message,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Scalars a step's launches may take.
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    pub n: usize,
    pub seed: u64,
    pub lr: f32,
}

/// Runs every launch of a lowered step: `inputs` are the step's operands
/// (updated in place by update ops) and `output` its result.
pub fn run_step(
    step: &LoweredStep,
    inputs: &mut [Vec<f32>],
    output: &mut Vec<f32>,
    scalars: StepScalars,
) -> Result<()> {
    let mut scratch: Vec<Vec<f32>> = step
        .scratch
        .iter()
        .map(|&len| vec![f32::NAN; len])
        .collect();
    for launch in &step.launches {
        let mut args = Vec::with_capacity(launch.args.len());
        for (binding, param) in launch.args.iter().zip(&launch.kernel.params) {
            let writes = param.kind == (ParamKind::Buffer { writes: true });
            let take =
                |v: &mut Vec<f32>| Arg::Buffer(if writes { std::mem::take(v) } else { v.clone() });
            args.push(match binding {
                Binding::Input(i) => take(&mut inputs[*i]),
                Binding::Output => take(output),
                Binding::Scratch(j) => take(&mut scratch[*j]),
                Binding::Batch => Arg::I32(i32::try_from(scalars.n).unwrap_or(i32::MAX)),
                Binding::Seed => Arg::U64(scalars.seed),
                Binding::LearningRate => Arg::F32(scalars.lr),
            });
        }
        let result = run(&launch.kernel, &mut args);
        // Hand written buffers back whether or not the launch succeeded.
        for ((binding, param), arg) in launch.args.iter().zip(&launch.kernel.params).zip(args) {
            let (ParamKind::Buffer { writes: true }, Arg::Buffer(data)) = (param.kind, arg) else {
                continue;
            };
            match binding {
                Binding::Input(i) => inputs[*i] = data,
                Binding::Output => *output = data,
                Binding::Scratch(j) => scratch[*j] = data,
                _ => {}
            }
        }
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::builder::KernelBuilder;
    use super::super::kernel::thread_idx;
    use super::*;

    #[test]
    fn shared_overrun_error_names_location() {
        let mut b = KernelBuilder::new("overrun", [64, 1, 1]);
        let tile = b.shared("tile", 32);
        b.store(tile.mem(), thread_idx(Axis::X), 1.0f32);
        let kernel = b.finish().expect("valid kernel");
        let err = run(&kernel, &mut []).expect_err("thread 32 writes past the tile");
        let text = err.to_string();
        assert!(text.contains("`overrun`"), "{text}");
        assert!(text.contains("shared array `tile`"), "{text}");
        assert!(text.contains("index 32"), "{text}");
        assert!(text.contains("thread (32, 0, 0)"), "{text}");
    }

    #[test]
    fn shuffle_sums_a_warp() {
        let mut b = KernelBuilder::new("warp_sum", [32, 1, 1]);
        let y = b.output("y");
        let v = b.let_("v", thread_idx(Axis::X).to_f32());
        for offset in [16, 8, 4, 2, 1] {
            let other = b.let_("other", 0.0f32);
            b.shfl_down(&other, &v, offset);
            b.assign(&v, &v + &other);
        }
        b.if_(thread_idx(Axis::X).equals(0), |b| b.store(y.mem(), 0, &v));
        let kernel = b.finish().expect("valid kernel");
        let mut args = [Arg::Buffer(vec![0.0])];
        run(&kernel, &mut args).expect("full warp");
        assert_eq!(args[0], Arg::Buffer(vec![496.0]));
    }

    #[test]
    fn shuffle_in_partial_warp_rejected() {
        let mut b = KernelBuilder::new("half_warp", [32, 1, 1]);
        b.if_(thread_idx(Axis::X).lt(16), |b| {
            let v = b.let_("v", 1.0f32);
            b.shfl_down(&v, &v, 1);
        });
        let kernel = b.finish().expect("valid kernel");
        let err = run(&kernel, &mut []).expect_err("half the lanes are inactive");
        assert!(err.to_string().contains("16 of the 32 lanes"), "{err}");
    }

    #[test]
    fn int_overflow_reported() {
        let mut b = KernelBuilder::new("overflow", [1, 1, 1]);
        let n = b.int_param("n");
        b.let_("big", &n * 65536);
        let kernel = b.finish().expect("valid kernel");
        let err = run(&kernel, &mut [Arg::I32(1 << 20)]).expect_err("2^36 overflows");
        assert!(err.to_string().contains("int overflow"), "{err}");
    }

    #[test]
    fn atomic_add_accumulates() {
        let mut b = KernelBuilder::new("count", [8, 1, 1]);
        let y = b.output("y");
        b.grid(3, 1, 1);
        b.atomic_add(y.mem(), 0, 1.0f32);
        let kernel = b.finish().expect("valid kernel");
        let mut args = [Arg::Buffer(vec![0.0])];
        run(&kernel, &mut args).expect("in bounds");
        assert_eq!(args[0], Arg::Buffer(vec![24.0]));
    }
}
