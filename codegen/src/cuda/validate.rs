//! Checks that a [`Kernel`] is well formed before it is printed or run:
//! expressions are well typed, registers are declared before use and in
//! scope, buffers are written only through writable parameters, the launch
//! shape fits the hardware limits, and every `__syncthreads()` is reached by
//! all threads of a block or by none.
//!
//! The barrier rule is the one the CUDA C Programming Guide states for
//! `__syncthreads()`: it is allowed in conditional code only if the condition
//! evaluates identically across the entire thread block. The check is a
//! uniformity analysis: an expression is block-uniform when it depends only
//! on constants, scalar parameters, block indices, dimensions and uniform
//! registers. Loads, thread indices and shuffles are treated as non-uniform,
//! and a register becomes non-uniform once any assignment to it is. A barrier
//! under a non-uniform `if` condition or loop bound is rejected.

use std::collections::HashSet;

use super::kernel::{
    BinOp, Expr, Kernel, Mem, Param, ParamKind, Special, Stmt, Ty, UnOp, VarDecl, VarId,
};
use super::{Error, Result};

/// Maximum threads per block on every architecture since compute capability 2.0
/// (CUDA C Programming Guide, "Compute Capabilities").
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;

/// Maximum static shared memory per block (CUDA C Programming Guide, "Compute
/// Capabilities"); more needs dynamic shared memory and an opt-in.
pub const MAX_STATIC_SHARED_BYTES: usize = 48 * 1024;

/// Type of `expr`, or why it is ill typed.
pub(crate) fn type_of(
    expr: &Expr,
    params: &[Param],
    vars: &[VarDecl],
) -> std::result::Result<Ty, String> {
    let ty = |e: &Expr| type_of(e, params, vars);
    match expr {
        Expr::I32(_) => Ok(Ty::I32),
        Expr::U64(_) => Ok(Ty::U64),
        Expr::F32(_) => Ok(Ty::F32),
        Expr::Bool(_) => Ok(Ty::Bool),
        Expr::Param(i) => {
            let p = params
                .get(*i)
                .ok_or(format!("parameter {i} does not exist"))?;
            p.kind
                .scalar_ty()
                .ok_or(format!("buffer `{}` used as a scalar", p.name))
        }
        Expr::Var(v) => vars
            .get(v.0 as usize)
            .map(|d| d.ty)
            .ok_or(format!("register {} does not exist", v.0)),
        Expr::Special(_) => Ok(Ty::I32),
        Expr::Unary(op, a) => {
            let t = ty(a)?;
            match (op, t) {
                (UnOp::Neg, Ty::I32 | Ty::F32) => Ok(t),
                (UnOp::Not, Ty::Bool) => Ok(Ty::Bool),
                (UnOp::Exp | UnOp::Log | UnOp::Sqrt | UnOp::Rsqrt, Ty::F32) => Ok(Ty::F32),
                _ => Err(format!("{op:?} does not apply to {}", t.c_name())),
            }
        }
        Expr::Binary(op, a, b) => {
            let (ta, tb) = (ty(a)?, ty(b)?);
            binary_type(*op, ta, tb)
        }
        Expr::Select(c, a, b) => {
            if ty(c)? != Ty::Bool {
                return Err("a select condition must be bool".into());
            }
            let (ta, tb) = (ty(a)?, ty(b)?);
            if ta != tb {
                return Err(format!(
                    "select arms differ: {} and {}",
                    ta.c_name(),
                    tb.c_name()
                ));
            }
            Ok(ta)
        }
        Expr::Cast(to, a) => {
            let from = ty(a)?;
            match (from, to) {
                (Ty::Bool, _) | (_, Ty::Bool) => {
                    Err("casts to or from bool are not supported".into())
                }
                _ => Ok(*to),
            }
        }
        Expr::Load(mem, index) => {
            if ty(index)? != Ty::I32 {
                return Err("a load index must be int".into());
            }
            if let Mem::Global(i) = mem {
                match params.get(*i).map(|p| p.kind) {
                    Some(ParamKind::Buffer { .. }) => {}
                    _ => return Err(format!("load from parameter {i}, which is not a buffer")),
                }
            }
            Ok(Ty::F32)
        }
    }
}

fn binary_type(op: BinOp, a: Ty, b: Ty) -> std::result::Result<Ty, String> {
    let bad = || {
        Err(format!(
            "{op:?} does not apply to {} and {}",
            a.c_name(),
            b.c_name()
        ))
    };
    match op {
        BinOp::Shr if matches!(a, Ty::I32 | Ty::U64) && b == Ty::I32 => Ok(a),
        BinOp::Shr => bad(),
        _ if a != b => bad(),
        BinOp::And | BinOp::Or if a == Ty::Bool => Ok(Ty::Bool),
        BinOp::And | BinOp::Or => bad(),
        BinOp::Xor if a == Ty::U64 => Ok(a),
        BinOp::Xor => bad(),
        _ if a == Ty::Bool => bad(),
        _ if op.is_comparison() => Ok(Ty::Bool),
        BinOp::Rem if a == Ty::F32 => bad(),
        _ => Ok(a),
    }
}

/// Validates `kernel`; the error names the kernel.
pub fn validate(kernel: &Kernel) -> Result<()> {
    let invalid = |message: String| Error::Invalid {
        kernel: kernel.name.clone(),
        message,
    };
    check_launch(kernel).map_err(invalid)?;
    let mut checker = Checker {
        kernel,
        scopes: vec![HashSet::new()],
        varying: HashSet::new(),
        grew: false,
    };
    // Types and scopes are checked in the first pass; later passes only grow
    // the set of non-uniform registers until it stops changing.
    checker.block(&kernel.body, true).map_err(invalid)?;
    while checker.grew {
        checker.grew = false;
        checker.scopes = vec![HashSet::new()];
        checker.block(&kernel.body, true).map_err(invalid)?;
    }
    Ok(())
}

fn check_launch(kernel: &Kernel) -> std::result::Result<(), String> {
    let threads = kernel.block.iter().map(|&d| d as u64).product::<u64>();
    if kernel.block.contains(&0) || threads > MAX_THREADS_PER_BLOCK as u64 {
        return Err(format!(
            "block {:?} must have between 1 and {MAX_THREADS_PER_BLOCK} threads",
            kernel.block
        ));
    }
    if kernel.shared_bytes() > MAX_STATIC_SHARED_BYTES {
        return Err(format!(
            "{} bytes of shared memory exceed the {MAX_STATIC_SHARED_BYTES}-byte static limit",
            kernel.shared_bytes()
        ));
    }
    for (axis, g) in kernel.grid.iter().enumerate() {
        if !params_only(g) {
            return Err(format!(
                "grid dimension {axis} must depend on scalar parameters only"
            ));
        }
        if type_of(g, &kernel.params, &kernel.vars)? != Ty::I32 {
            return Err(format!("grid dimension {axis} must be int"));
        }
    }
    Ok(())
}

fn params_only(e: &Expr) -> bool {
    match e {
        Expr::I32(_) | Expr::U64(_) | Expr::F32(_) | Expr::Bool(_) | Expr::Param(_) => true,
        Expr::Var(_) | Expr::Special(_) | Expr::Load(..) => false,
        Expr::Unary(_, a) | Expr::Cast(_, a) => params_only(a),
        Expr::Binary(_, a, b) => params_only(a) && params_only(b),
        Expr::Select(c, a, b) => params_only(c) && params_only(a) && params_only(b),
    }
}

struct Checker<'a> {
    kernel: &'a Kernel,
    /// Registers in scope, innermost block last.
    scopes: Vec<HashSet<VarId>>,
    /// Registers that may differ between threads of a block.
    varying: HashSet<VarId>,
    /// Whether this pass added to `varying`.
    grew: bool,
}

impl Checker<'_> {
    fn var_name(&self, v: VarId) -> &str {
        self.kernel
            .vars
            .get(v.0 as usize)
            .map_or("?", |d| d.name.as_str())
    }

    fn in_scope(&self, v: VarId) -> bool {
        self.scopes.iter().any(|s| s.contains(&v))
    }

    /// Type-checks `e`, checks that its registers are in scope, and returns
    /// whether it is block-uniform.
    fn expr(&self, e: &Expr, want: Option<Ty>) -> std::result::Result<bool, String> {
        let ty = type_of(e, &self.kernel.params, &self.kernel.vars)?;
        if let Some(want) = want.filter(|w| *w != ty) {
            return Err(format!(
                "expected {}, found {} in {e:?}",
                want.c_name(),
                ty.c_name()
            ));
        }
        self.uniform(e)
    }

    fn uniform(&self, e: &Expr) -> std::result::Result<bool, String> {
        Ok(match e {
            Expr::I32(_) | Expr::U64(_) | Expr::F32(_) | Expr::Bool(_) | Expr::Param(_) => true,
            Expr::Var(v) => {
                if !self.in_scope(*v) {
                    return Err(format!(
                        "register `{}` is used outside its scope",
                        self.var_name(*v)
                    ));
                }
                !self.varying.contains(v)
            }
            Expr::Special(s) => !matches!(s, Special::ThreadIdx(_)),
            Expr::Unary(_, a) | Expr::Cast(_, a) => self.uniform(a)?,
            Expr::Binary(_, a, b) => self.uniform(a)? & self.uniform(b)?,
            Expr::Select(c, a, b) => self.uniform(c)? & self.uniform(a)? & self.uniform(b)?,
            Expr::Load(mem, i) => {
                self.mem(*mem)?;
                self.uniform(i)?;
                false
            }
        })
    }

    fn mem(&self, mem: Mem) -> std::result::Result<(), String> {
        match mem {
            Mem::Shared(i) if i >= self.kernel.shared.len() => {
                Err(format!("shared array {i} does not exist"))
            }
            Mem::Global(i)
                if !matches!(
                    self.kernel.params.get(i).map(|p| p.kind),
                    Some(ParamKind::Buffer { .. })
                ) =>
            {
                Err(format!("parameter {i} is not a buffer"))
            }
            _ => Ok(()),
        }
    }

    fn writable(&self, mem: Mem) -> std::result::Result<(), String> {
        self.mem(mem)?;
        if let Mem::Global(i) = mem {
            let p = &self.kernel.params[i];
            if p.kind != (ParamKind::Buffer { writes: true }) {
                return Err(format!("store to read-only buffer `{}`", p.name));
            }
        }
        Ok(())
    }

    fn declare(&mut self, v: VarId) -> std::result::Result<(), String> {
        if v.0 as usize >= self.kernel.vars.len() {
            return Err(format!("register {} does not exist", v.0));
        }
        if self.in_scope(v) {
            return Err(format!("register `{}` is declared twice", self.var_name(v)));
        }
        self.scopes.last_mut().expect("a scope is open").insert(v);
        Ok(())
    }

    fn mark(&mut self, v: VarId, uniform: bool) {
        if !uniform && self.varying.insert(v) {
            self.grew = true;
        }
    }

    fn assign(
        &mut self,
        v: VarId,
        value: &Expr,
        uniform_flow: bool,
    ) -> std::result::Result<(), String> {
        let ty = self.kernel.vars.get(v.0 as usize).map(|d| d.ty);
        let u = self.expr(value, ty)?;
        self.mark(v, u && uniform_flow);
        Ok(())
    }

    /// Checks a block; `flow` is whether control reaching it is block-uniform.
    fn block(&mut self, stmts: &[Stmt], flow: bool) -> std::result::Result<(), String> {
        self.scopes.push(HashSet::new());
        for s in stmts {
            self.stmt(s, flow)?;
        }
        self.scopes.pop();
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt, flow: bool) -> std::result::Result<(), String> {
        match s {
            Stmt::Let { var, init } => {
                self.declare(*var)?;
                self.assign(*var, init, flow)?;
            }
            Stmt::Assign { var, value } => {
                if !self.in_scope(*var) {
                    return Err(format!(
                        "assignment to `{}` outside its scope",
                        self.var_name(*var)
                    ));
                }
                self.assign(*var, value, flow)?;
            }
            Stmt::Store { mem, index, value } | Stmt::AtomicAdd { mem, index, value } => {
                self.writable(*mem)?;
                self.expr(index, Some(Ty::I32))?;
                self.expr(value, Some(Ty::F32))?;
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                if self.kernel.vars.get(var.0 as usize).map(|d| d.ty) != Some(Ty::I32) {
                    return Err(format!(
                        "loop variable `{}` must be int",
                        self.var_name(*var)
                    ));
                }
                let bounds = self.expr(start, Some(Ty::I32))?
                    & self.expr(end, Some(Ty::I32))?
                    & self.expr(step, Some(Ty::I32))?;
                self.scopes.push(HashSet::new());
                self.declare(*var)?;
                let inner = flow && bounds && !self.varying.contains(var);
                self.mark(*var, inner);
                // The body runs with the loop variable in scope.
                let result = self.block(body, inner);
                self.scopes.pop();
                result?;
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let inner = flow && self.expr(cond, Some(Ty::Bool))?;
                self.block(then, inner)?;
                self.block(otherwise, inner)?;
            }
            Stmt::Barrier if !flow => {
                return Err(
                    "__syncthreads() is inside control flow that is not block-uniform \
                     (a condition or loop bound depends on threadIdx, a load or a varying register)"
                        .into(),
                );
            }
            Stmt::Barrier | Stmt::Comment(_) => {}
            Stmt::ShflDown { var, value, offset } => {
                if !self.in_scope(*var) {
                    return Err(format!(
                        "shuffle into `{}` outside its scope",
                        self.var_name(*var)
                    ));
                }
                let ty = self.kernel.vars.get(var.0 as usize).map(|d| d.ty);
                if ty != Some(Ty::F32) {
                    return Err("shuffles move float registers only".into());
                }
                self.expr(value, Some(Ty::F32))?;
                self.expr(offset, Some(Ty::I32))?;
                self.mark(*var, false);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::builder::KernelBuilder;
    use super::super::kernel::{thread_idx, Axis};

    #[test]
    fn barrier_under_thread_condition_rejected() {
        let mut b = KernelBuilder::new("divergent", [64, 1, 1]);
        b.if_(thread_idx(Axis::X).lt(32), |b| b.barrier());
        let err = b.finish().expect_err("a divergent barrier is invalid");
        let text = err.to_string();
        assert!(text.contains("divergent"), "{text}");
        assert!(text.contains("__syncthreads"), "{text}");
    }

    #[test]
    fn barrier_in_uniform_loop_accepted() {
        let mut b = KernelBuilder::new("uniform", [64, 1, 1]);
        let n = b.int_param("n");
        b.for_("k", 0, n, 1, |b, _| b.barrier());
        assert!(b.finish().is_ok());
    }

    #[test]
    fn barrier_after_varying_assignment_rejected() {
        // `limit` starts uniform but a later assignment makes it depend on
        // threadIdx, so the loop bounded by it is divergent.
        let mut b = KernelBuilder::new("late_varying", [64, 1, 1]);
        let limit = b.let_("limit", 4);
        b.for_("k", 0, &limit, 1, |b, _| b.barrier());
        b.assign(&limit, thread_idx(Axis::X));
        assert!(b.finish().is_err());
    }

    #[test]
    fn store_to_input_rejected() {
        let mut b = KernelBuilder::new("readonly", [32, 1, 1]);
        let x = b.input("x");
        b.store(x.mem(), 0, 1.0f32);
        let err = b.finish().expect_err("inputs are read-only");
        assert!(err.to_string().contains("read-only buffer `x`"), "{err}");
    }

    #[test]
    fn ill_typed_store_rejected() {
        let mut b = KernelBuilder::new("types", [32, 1, 1]);
        let y = b.output("y");
        b.store(y.mem(), 0, 1);
        assert!(b.finish().is_err());
    }

    #[test]
    fn oversized_block_rejected() {
        let b = KernelBuilder::new("huge", [1024, 2, 1]);
        assert!(b.finish().is_err());
    }
}
