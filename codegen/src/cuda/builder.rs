//! A builder that assembles a [`Kernel`] statement by statement, with nested
//! blocks written as closures so that the Rust code that generates a kernel
//! has the shape of the kernel it generates.
//!
//! Register names are made unique by appending a counter, and each `let`
//! takes the type of its initial value. [`KernelBuilder::finish`] validates
//! the whole kernel, so a lowering bug surfaces as an error naming the kernel.

use super::kernel::{Axis, Expr, Kernel, Mem, Param, ParamKind, SharedArray, Stmt, VarDecl, VarId};
use super::validate::{type_of, validate};
use super::Result;

/// A buffer parameter, for loads and stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer(pub usize);

impl Buffer {
    pub fn load(self, index: impl Into<Expr>) -> Expr {
        Expr::Load(Mem::Global(self.0), Box::new(index.into()))
    }

    pub fn mem(self) -> Mem {
        Mem::Global(self.0)
    }
}

/// A shared array, for loads and stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared(pub usize);

impl Shared {
    pub fn load(self, index: impl Into<Expr>) -> Expr {
        Expr::Load(Mem::Shared(self.0), Box::new(index.into()))
    }

    pub fn mem(self) -> Mem {
        Mem::Shared(self.0)
    }
}

pub struct KernelBuilder {
    kernel: Kernel,
    /// Open blocks, innermost last; the first is the kernel body.
    blocks: Vec<Vec<Stmt>>,
    /// The first type error met while declaring a register.
    error: Option<String>,
}

impl KernelBuilder {
    /// Starts a kernel with a one-block grid; call [`KernelBuilder::grid`] to
    /// size it.
    pub fn new(name: impl Into<String>, block: [u32; 3]) -> KernelBuilder {
        KernelBuilder {
            kernel: Kernel {
                name: name.into(),
                doc: String::new(),
                params: Vec::new(),
                shared: Vec::new(),
                vars: Vec::new(),
                block,
                grid: [Expr::I32(1), Expr::I32(1), Expr::I32(1)],
                body: Vec::new(),
            },
            blocks: vec![Vec::new()],
            error: None,
        }
    }

    pub fn doc(&mut self, text: impl Into<String>) {
        self.kernel.doc = text.into();
    }

    pub fn grid(&mut self, x: impl Into<Expr>, y: impl Into<Expr>, z: impl Into<Expr>) {
        self.kernel.grid = [x.into(), y.into(), z.into()];
    }

    fn param(&mut self, name: &str, kind: ParamKind) -> usize {
        self.kernel.params.push(Param {
            name: name.to_string(),
            kind,
        });
        self.kernel.params.len() - 1
    }

    /// A read-only buffer parameter.
    pub fn input(&mut self, name: &str) -> Buffer {
        Buffer(self.param(name, ParamKind::Buffer { writes: false }))
    }

    /// A buffer parameter the kernel writes.
    pub fn output(&mut self, name: &str) -> Buffer {
        Buffer(self.param(name, ParamKind::Buffer { writes: true }))
    }

    pub fn int_param(&mut self, name: &str) -> Expr {
        Expr::Param(self.param(name, ParamKind::I32))
    }

    pub fn u64_param(&mut self, name: &str) -> Expr {
        Expr::Param(self.param(name, ParamKind::U64))
    }

    pub fn f32_param(&mut self, name: &str) -> Expr {
        Expr::Param(self.param(name, ParamKind::F32))
    }

    pub fn shared(&mut self, name: &str, len: usize) -> Shared {
        self.kernel.shared.push(SharedArray {
            name: name.to_string(),
            len,
        });
        Shared(self.kernel.shared.len() - 1)
    }

    /// Threads per block along x.
    pub fn block_x(&self) -> u32 {
        self.kernel.block[0]
    }

    fn push(&mut self, stmt: Stmt) {
        self.blocks
            .last_mut()
            .expect("the kernel body block is never closed")
            .push(stmt);
    }

    fn new_var(&mut self, name: &str, ty: super::kernel::Ty) -> VarId {
        let taken = |n: &str, vars: &[VarDecl]| vars.iter().any(|v| v.name == n);
        let mut unique = name.to_string();
        let mut k = 1;
        while taken(&unique, &self.kernel.vars) {
            unique = format!("{name}_{k}");
            k += 1;
        }
        self.kernel.vars.push(VarDecl { name: unique, ty });
        VarId((self.kernel.vars.len() - 1) as u32)
    }

    /// Declares a register holding `init` and returns it as an expression.
    pub fn let_(&mut self, name: &str, init: impl Into<Expr>) -> Expr {
        let init = init.into();
        let ty = match type_of(&init, &self.kernel.params, &self.kernel.vars) {
            Ok(ty) => ty,
            Err(message) => {
                self.error
                    .get_or_insert(format!("register `{name}`: {message}"));
                super::kernel::Ty::F32
            }
        };
        let var = self.new_var(name, ty);
        self.push(Stmt::Let { var, init });
        Expr::Var(var)
    }

    /// Assigns to a register made by [`KernelBuilder::let_`].
    pub fn assign(&mut self, var: &Expr, value: impl Into<Expr>) {
        let Expr::Var(var) = var else {
            self.error
                .get_or_insert(format!("assignment to a non-register {var:?}"));
            return;
        };
        self.push(Stmt::Assign {
            var: *var,
            value: value.into(),
        });
    }

    pub fn store(&mut self, mem: Mem, index: impl Into<Expr>, value: impl Into<Expr>) {
        self.push(Stmt::Store {
            mem,
            index: index.into(),
            value: value.into(),
        });
    }

    pub fn atomic_add(&mut self, mem: Mem, index: impl Into<Expr>, value: impl Into<Expr>) {
        self.push(Stmt::AtomicAdd {
            mem,
            index: index.into(),
            value: value.into(),
        });
    }

    pub fn barrier(&mut self) {
        self.push(Stmt::Barrier);
    }

    pub fn comment(&mut self, text: impl Into<String>) {
        self.push(Stmt::Comment(text.into()));
    }

    /// `var = __shfl_down_sync(0xffffffff, value, offset)`.
    pub fn shfl_down(&mut self, var: &Expr, value: impl Into<Expr>, offset: impl Into<Expr>) {
        let Expr::Var(var) = var else {
            self.error
                .get_or_insert(format!("shuffle into a non-register {var:?}"));
            return;
        };
        self.push(Stmt::ShflDown {
            var: *var,
            value: value.into(),
            offset: offset.into(),
        });
    }

    fn block(&mut self, body: impl FnOnce(&mut Self)) -> Vec<Stmt> {
        self.blocks.push(Vec::new());
        body(self);
        self.blocks.pop().expect("the block pushed above")
    }

    /// `for (int name = start; name < end; name += step) { body(name) }`.
    pub fn for_(
        &mut self,
        name: &str,
        start: impl Into<Expr>,
        end: impl Into<Expr>,
        step: impl Into<Expr>,
        body: impl FnOnce(&mut Self, Expr),
    ) {
        let var = self.new_var(name, super::kernel::Ty::I32);
        let body = self.block(|b| body(b, Expr::Var(var)));
        self.push(Stmt::For {
            var,
            start: start.into(),
            end: end.into(),
            step: step.into(),
            body,
        });
    }

    pub fn if_(&mut self, cond: impl Into<Expr>, then: impl FnOnce(&mut Self)) {
        let then = self.block(then);
        self.push(Stmt::If {
            cond: cond.into(),
            then,
            otherwise: Vec::new(),
        });
    }

    pub fn if_else(
        &mut self,
        cond: impl Into<Expr>,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        let then = self.block(then);
        let otherwise = self.block(otherwise);
        self.push(Stmt::If {
            cond: cond.into(),
            then,
            otherwise,
        });
    }

    /// `blockIdx.x * blockDim.x + threadIdx.x`.
    pub fn global_thread_x(&mut self) -> Expr {
        let index = super::kernel::block_idx(Axis::X) * super::kernel::block_dim(Axis::X)
            + super::kernel::thread_idx(Axis::X);
        self.let_("i", index)
    }

    /// Closes the kernel and validates it.
    pub fn finish(mut self) -> Result<Kernel> {
        self.kernel.body = self.blocks.pop().expect("the kernel body block");
        if let Some(message) = self.error {
            return Err(super::Error::Invalid {
                kernel: self.kernel.name,
                message,
            });
        }
        validate(&self.kernel)?;
        Ok(self.kernel)
    }
}
