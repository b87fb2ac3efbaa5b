//! The kernel IR: one CUDA kernel as typed expressions and structured
//! statements, small enough to print as CUDA C, interpret on the CPU and
//! validate.
//!
//! A kernel has buffer and scalar parameters, statically sized `__shared__`
//! arrays of f32, a constant block shape and a grid shape given as expressions
//! of its scalar parameters (the batch size, usually). Its body uses registers
//! declared by `Let`, `for` loops with an additive step, `if`/`else`, global
//! and shared loads and stores, `__syncthreads()`, `__shfl_down_sync` over a
//! full warp and `atomicAdd`. Integers are 32-bit `int` unless an expression
//! is `U64` (`unsigned long long`, used by the counter-based random numbers).
//!
//! Expressions are built with the operator overloads and methods below, which
//! fold integer constants so that printed code carries no `+ 0` or `* 1`.

use std::ops::{Add, Div, Mul, Neg, Rem, Sub};

/// Scalar type of an expression or register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ty {
    I32,
    U64,
    F32,
    Bool,
}

impl Ty {
    /// The CUDA C spelling.
    pub fn c_name(self) -> &'static str {
        match self {
            Ty::I32 => "int",
            Ty::U64 => "unsigned long long",
            Ty::F32 => "float",
            Ty::Bool => "bool",
        }
    }
}

/// Axis of a `dim3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    X,
    Y,
    Z,
}

impl Axis {
    pub fn index(self) -> usize {
        match self {
            Axis::X => 0,
            Axis::Y => 1,
            Axis::Z => 2,
        }
    }

    pub fn name(self) -> &'static str {
        ["x", "y", "z"][self.index()]
    }
}

/// CUDA's built-in index variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Special {
    ThreadIdx(Axis),
    BlockIdx(Axis),
    BlockDim(Axis),
    GridDim(Axis),
}

/// Index of a register in [`Kernel::vars`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VarId(pub u32);

/// A memory a load or store addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mem {
    /// The buffer parameter with this index in [`Kernel::params`].
    Global(usize),
    /// The shared array with this index in [`Kernel::shared`].
    Shared(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    /// Short-circuit `&&`: the right side is evaluated only when the left is true.
    And,
    /// Short-circuit `||`.
    Or,
    Shr,
    Xor,
}

impl BinOp {
    /// Whether the operator compares its operands and yields `Bool`.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne
        )
    }
}

/// An expression. `Select` and the logical operators evaluate lazily, as the
/// C operators `?:`, `&&` and `||` do, so a guarded load never runs out of
/// bounds.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    /// The scalar parameter with this index in [`Kernel::params`].
    Param(usize),
    Var(VarId),
    Special(Special),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `cond ? then : otherwise`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// A C cast: `(float)`, `(int)` (truncation toward zero) or
    /// `(unsigned long long)`.
    Cast(Ty, Box<Expr>),
    Load(Mem, Box<Expr>),
}

/// A statement. Blocks are plain vectors of statements.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// Declares register `var` (of its type in [`Kernel::vars`]) with a value.
    Let {
        var: VarId,
        init: Expr,
    },
    Assign {
        var: VarId,
        value: Expr,
    },
    Store {
        mem: Mem,
        index: Expr,
        value: Expr,
    },
    /// `atomicAdd(&mem[index], value)`; the result is discarded.
    AtomicAdd {
        mem: Mem,
        index: Expr,
        value: Expr,
    },
    /// `for (int var = start; var < end; var += step)`, with `end` and `step`
    /// evaluated before every iteration as in C.
    For {
        var: VarId,
        start: Expr,
        end: Expr,
        step: Expr,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
    /// `__syncthreads()`.
    Barrier,
    /// `var = __shfl_down_sync(0xffffffff, value, offset)`: every lane of the
    /// warp must execute it together.
    ShflDown {
        var: VarId,
        value: Expr,
        offset: Expr,
    },
    /// A line comment in the printed source.
    Comment(String),
}

/// Kind of a kernel parameter: a buffer pointer or a scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A pointer to f32 global memory; `writes` makes it non-`const`.
    Buffer {
        writes: bool,
    },
    I32,
    U64,
    F32,
}

impl ParamKind {
    /// Type of the value of a scalar parameter, `None` for buffers.
    pub fn scalar_ty(self) -> Option<Ty> {
        match self {
            ParamKind::Buffer { .. } => None,
            ParamKind::I32 => Some(Ty::I32),
            ParamKind::U64 => Some(Ty::U64),
            ParamKind::F32 => Some(Ty::F32),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
}

/// A statically sized `__shared__ float name[len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedArray {
    pub name: String,
    pub len: usize,
}

/// A register: its name in the printed source and its type.
#[derive(Debug, Clone, PartialEq)]
pub struct VarDecl {
    pub name: String,
    pub ty: Ty,
}

/// One kernel and its launch shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub name: String,
    /// Description of the computation and of the launch shape, printed above
    /// the function.
    pub doc: String,
    pub params: Vec<Param>,
    pub shared: Vec<SharedArray>,
    pub vars: Vec<VarDecl>,
    /// Threads per block along x, y and z.
    pub block: [u32; 3],
    /// Blocks along x, y and z, as expressions of the scalar parameters.
    pub grid: [Expr; 3],
    pub body: Vec<Stmt>,
}

impl Kernel {
    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }

    /// Bytes of static shared memory per block.
    pub fn shared_bytes(&self) -> usize {
        self.shared.iter().map(|s| 4 * s.len).sum()
    }
}

/// An `int` constant from a size. Lowering rejects tensors with more elements
/// per image than an `int` holds, so the sizes it passes here fit.
pub fn int(value: usize) -> Expr {
    Expr::I32(i32::try_from(value).expect("sizes are checked to fit in an int before lowering"))
}

/// A `float` constant.
pub fn float(value: f32) -> Expr {
    Expr::F32(value)
}

/// `threadIdx.x` and friends.
pub fn thread_idx(axis: Axis) -> Expr {
    Expr::Special(Special::ThreadIdx(axis))
}

pub fn block_idx(axis: Axis) -> Expr {
    Expr::Special(Special::BlockIdx(axis))
}

pub fn block_dim(axis: Axis) -> Expr {
    Expr::Special(Special::BlockDim(axis))
}

pub fn grid_dim(axis: Axis) -> Expr {
    Expr::Special(Special::GridDim(axis))
}

/// `(a + b - 1) / b` for a positive constant `b`.
pub fn ceil_div(a: Expr, b: usize) -> Expr {
    (a + int(b - 1)) / int(b)
}

impl From<i32> for Expr {
    fn from(v: i32) -> Expr {
        Expr::I32(v)
    }
}

impl From<f32> for Expr {
    fn from(v: f32) -> Expr {
        Expr::F32(v)
    }
}

impl From<u64> for Expr {
    fn from(v: u64) -> Expr {
        Expr::U64(v)
    }
}

impl From<&Expr> for Expr {
    fn from(v: &Expr) -> Expr {
        v.clone()
    }
}

/// Builds `lhs op rhs`, folding `int` constants where the result fits and
/// dropping identities (`x + 0`, `x * 1`, `x / 1`).
fn binary(op: BinOp, lhs: Expr, rhs: Expr) -> Expr {
    if let (Expr::I32(a), Expr::I32(b)) = (&lhs, &rhs) {
        let folded = match op {
            BinOp::Add => a.checked_add(*b),
            BinOp::Sub => a.checked_sub(*b),
            BinOp::Mul => a.checked_mul(*b),
            BinOp::Div if *b != 0 => a.checked_div(*b),
            BinOp::Rem if *b != 0 => a.checked_rem(*b),
            BinOp::Min => Some(*a.min(b)),
            BinOp::Max => Some(*a.max(b)),
            _ => None,
        };
        if let Some(v) = folded {
            return Expr::I32(v);
        }
    }
    match (op, &lhs, &rhs) {
        (BinOp::Add, Expr::I32(0), _) => rhs,
        (BinOp::Add | BinOp::Sub, _, Expr::I32(0)) => lhs,
        (BinOp::Mul, Expr::I32(1), _) => rhs,
        (BinOp::Mul | BinOp::Div, _, Expr::I32(1)) => lhs,
        (BinOp::Mul, Expr::I32(0), _) | (BinOp::Mul, _, Expr::I32(0)) => Expr::I32(0),
        (BinOp::Rem, _, Expr::I32(1)) => Expr::I32(0),
        (BinOp::And, Expr::Bool(true), _) => rhs,
        (BinOp::And, _, Expr::Bool(true)) => lhs,
        _ => Expr::Binary(op, Box::new(lhs), Box::new(rhs)),
    }
}

macro_rules! arith {
    ($trait:ident, $method:ident, $op:expr) => {
        impl<T: Into<Expr>> $trait<T> for Expr {
            type Output = Expr;
            fn $method(self, rhs: T) -> Expr {
                binary($op, self, rhs.into())
            }
        }
        impl<T: Into<Expr>> $trait<T> for &Expr {
            type Output = Expr;
            fn $method(self, rhs: T) -> Expr {
                binary($op, self.clone(), rhs.into())
            }
        }
    };
}

arith!(Add, add, BinOp::Add);
arith!(Sub, sub, BinOp::Sub);
arith!(Mul, mul, BinOp::Mul);
arith!(Div, div, BinOp::Div);
arith!(Rem, rem, BinOp::Rem);

/// `f32 op Expr`, so that float constants can stand on the left as they do
/// in the formulas the kernels implement.
macro_rules! float_lhs {
    ($trait:ident, $method:ident, $op:expr) => {
        impl $trait<Expr> for f32 {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                binary($op, Expr::F32(self), rhs)
            }
        }
        impl $trait<&Expr> for f32 {
            type Output = Expr;
            fn $method(self, rhs: &Expr) -> Expr {
                binary($op, Expr::F32(self), rhs.clone())
            }
        }
    };
}

float_lhs!(Add, add, BinOp::Add);
float_lhs!(Sub, sub, BinOp::Sub);
float_lhs!(Mul, mul, BinOp::Mul);
float_lhs!(Div, div, BinOp::Div);

impl Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        Expr::Unary(UnOp::Neg, Box::new(self))
    }
}

impl Expr {
    fn bin(&self, op: BinOp, rhs: impl Into<Expr>) -> Expr {
        binary(op, self.clone(), rhs.into())
    }

    fn un(&self, op: UnOp) -> Expr {
        Expr::Unary(op, Box::new(self.clone()))
    }

    pub fn lt(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Lt, rhs)
    }
    pub fn le(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Le, rhs)
    }
    pub fn gt(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Gt, rhs)
    }
    pub fn ge(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Ge, rhs)
    }
    pub fn equals(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Eq, rhs)
    }
    pub fn not_equals(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Ne, rhs)
    }
    pub fn and(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::And, rhs)
    }
    pub fn or(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Or, rhs)
    }
    pub fn min(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Min, rhs)
    }
    pub fn max(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Max, rhs)
    }
    pub fn shr(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Shr, rhs)
    }
    pub fn xor(&self, rhs: impl Into<Expr>) -> Expr {
        self.bin(BinOp::Xor, rhs)
    }
    pub fn logical_not(&self) -> Expr {
        self.un(UnOp::Not)
    }
    pub fn exp(&self) -> Expr {
        self.un(UnOp::Exp)
    }
    pub fn log(&self) -> Expr {
        self.un(UnOp::Log)
    }
    pub fn sqrt(&self) -> Expr {
        self.un(UnOp::Sqrt)
    }
    pub fn rsqrt(&self) -> Expr {
        self.un(UnOp::Rsqrt)
    }

    /// `self ? then : otherwise`.
    pub fn select(&self, then: impl Into<Expr>, otherwise: impl Into<Expr>) -> Expr {
        Expr::Select(
            Box::new(self.clone()),
            Box::new(then.into()),
            Box::new(otherwise.into()),
        )
    }

    pub fn cast(&self, ty: Ty) -> Expr {
        Expr::Cast(ty, Box::new(self.clone()))
    }

    pub fn to_f32(&self) -> Expr {
        self.cast(Ty::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_fold() {
        assert_eq!(int(2) * int(3) + int(1), Expr::I32(7));
        assert_eq!(ceil_div(int(10), 4), Expr::I32(3));
    }

    #[test]
    fn identities_vanish() {
        let x = Expr::Param(0);
        assert_eq!(&x + 0, x);
        assert_eq!(&x * 1, x);
        let zero = Expr::I32(0);
        assert_eq!(&x * zero.clone(), zero);
        assert_eq!(x.lt(1).and(Expr::Bool(true)), x.lt(1));
    }

    #[test]
    fn overflow_is_not_folded() {
        let big = Expr::I32(i32::MAX) + 1;
        assert!(matches!(big, Expr::Binary(BinOp::Add, ..)));
    }
}
