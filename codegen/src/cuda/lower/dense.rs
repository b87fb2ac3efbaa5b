//! Linear layers, the softmax cross-entropy loss, and the in-place updates
//! (SGD with momentum, RMSprop and batch-norm running statistics).
//!
//! Matrices are row-major: `x` is `[rows, c]`, `w` is `[c, k]`, `b` is `[k]`,
//! logits are `[rows, k]` and labels `[rows]` (class indices stored as f32).
//! The linear kernels give each thread one output element and a sequential
//! dot product, which is deterministic and enough for classifier heads.
//!
//! NOTE: a label that is neither a class index nor the ignore label makes the
//! loss and its gradient rows NaN, because a kernel cannot return the error
//! that the CPU reference raises. The NaN then shows up in the logged loss.

use ldnc_ir::{Op, TensorType};

use super::norm::block_sum;
use super::{numel, unsupported, LoweredStep, Lowering, THREADS};
use crate::cuda::builder::{Buffer, KernelBuilder};
use crate::cuda::kernel::{int, thread_idx, Axis, Expr, Ty};
use crate::cuda::Result;

/// Lowers the ops listed for this module in [`super`].
pub fn lower(op: &Op, inputs: &[&TensorType], out: &TensorType) -> Result<LoweredStep> {
    let launch = match op {
        Op::Linear => linear(inputs[0].channels(), out.channels(), out)?,
        Op::LinearBackwardData => linear_backward_data(out.channels(), inputs[0].channels(), out)?,
        Op::LinearBackwardWeight => linear_backward_weight(out.dims[0], out.dims[1])?,
        Op::SoftmaxCrossEntropy { ignore, weighted } => {
            let loss = Loss::new(op, inputs, *ignore, *weighted)?;
            loss_forward(&loss)?
        }
        Op::SoftmaxCrossEntropyBackward {
            weight,
            ignore,
            weighted,
        } => {
            let loss = Loss::new(op, inputs, *ignore, *weighted)?;
            return loss_backward(&loss, *weight);
        }
        Op::SgdUpdate {
            momentum,
            weight_decay,
            nesterov,
        } => sgd(out.per_item(), *momentum, *weight_decay, *nesterov)?,
        Op::RmsPropUpdate {
            decay,
            eps,
            weight_decay,
        } => rmsprop(out.per_item(), *decay, *eps, *weight_decay)?,
        Op::BnRunningUpdate { momentum, per_item } => {
            running_update(out.channels(), *momentum, *per_item)?
        }
        _ => return Err(unsupported(op, "not a dense op")),
    };
    Ok(LoweredStep::single(launch))
}

/// `y = x w + b`: thread `i` computes `y[row, j]` with `row = i / k`.
fn linear(c: usize, k: usize, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("linear", THREADS);
    l.doc(format!(
        "y = x w + b with {c} inputs and {k} outputs. One thread per output element."
    ));
    let x = l.operand("x", 0);
    let w = l.operand("w", 1);
    let bias = l.operand("b", 2);
    let y = l.result("y");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let row = b.let_("row", &i / int(k));
        let j = b.let_("j", &i % int(k));
        let acc = b.let_("acc", bias.load(&j));
        b.for_("c", 0, int(c), 1, |b, ci| {
            b.assign(
                &acc,
                &acc + x.load(&row * int(c) + &ci) * w.load(ci * int(k) + &j),
            );
        });
        b.store(y.mem(), &i, acc);
    });
    l.finish()
}

/// `dx = dy w^T`.
fn linear_backward_data(c: usize, k: usize, out: &TensorType) -> Result<super::Launch> {
    let mut l = Lowering::new("linear_backward_data", THREADS);
    l.doc(format!(
        "dx = dy w^T for a [{c}, {k}] weight. One thread per element of dx."
    ));
    let dy = l.operand("dy", 0);
    let w = l.operand("w", 1);
    let dx = l.result("dx");
    let n = l.batch();
    l.per_element(numel(out, &n), |b, i| {
        let row = b.let_("row", &i / int(c));
        let ci = b.let_("ci", &i % int(c));
        let acc = b.let_("acc", 0.0f32);
        b.for_("j", 0, int(k), 1, |b, j| {
            b.assign(
                &acc,
                &acc + dy.load(&row * int(k) + &j) * w.load(&ci * int(k) + j),
            );
        });
        b.store(dx.mem(), &i, acc);
    });
    l.finish()
}

/// `dw = x^T dy`, summing the batch in order.
fn linear_backward_weight(c: usize, k: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("linear_backward_weight", THREADS);
    l.doc(format!(
        "dw = x^T dy as a [{c}, {k}] matrix. One thread per weight, adding the batch in order."
    ));
    let x = l.operand("x", 0);
    let dy = l.operand("dy", 1);
    let dw = l.result("dw");
    let n = l.batch();
    l.per_element(int(c * k), |b, i| {
        let ci = b.let_("ci", &i / int(k));
        let j = b.let_("j", &i % int(k));
        let acc = b.let_("acc", 0.0f32);
        b.for_("r", 0, &n, 1, |b, r| {
            b.assign(
                &acc,
                &acc + x.load(&r * int(c) + &ci) * dy.load(r * int(k) + &j),
            );
        });
        b.store(dw.mem(), &i, acc);
    });
    l.finish()
}

/// The class layout of a softmax cross-entropy.
struct Loss {
    classes: usize,
    /// Labels per image (1 for classification, `h * w` for segmentation).
    labels_per_item: usize,
    labels_batched: bool,
    ignore: Option<u32>,
    /// Whether operand 2 contains one weight per class.
    weighted: bool,
}

impl Loss {
    fn new(op: &Op, inputs: &[&TensorType], ignore: Option<u32>, weighted: bool) -> Result<Loss> {
        let classes = inputs[0].channels();
        if classes == 0 {
            return Err(unsupported(op, "logits have no classes"));
        }
        Ok(Loss {
            classes,
            labels_per_item: inputs[1].per_item(),
            labels_batched: inputs[1].batched,
            ignore,
            weighted,
        })
    }

    /// Binds operand 2 as the class weights when the loss is weighted.
    fn weights(&self, l: &mut Lowering) -> Option<Buffer> {
        self.weighted.then(|| l.operand("class_weights", 2))
    }

    fn rows(&self, n: &Expr) -> Expr {
        if self.labels_batched {
            n * int(self.labels_per_item)
        } else {
            int(self.labels_per_item)
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} classes{}{}",
            self.classes,
            self.ignore
                .map_or(String::new(), |i| format!(", ignore label {i}")),
            if self.weighted { ", class weights" } else { "" }
        )
    }

    /// Whether row label `label` is the ignore label.
    fn ignored(&self, label: &Expr) -> Expr {
        match self.ignore {
            Some(i) => label.equals(i as f32),
            None => Expr::Bool(false),
        }
    }

    /// Whether `label` is a whole number in `0..classes`; the conditions are
    /// ordered so that the cast only runs on values in range.
    fn valid(&self, label: &Expr) -> Expr {
        label
            .ge(0.0f32)
            .and(label.lt(self.classes as f32))
            .and(label.cast(Ty::I32).to_f32().equals(label))
    }

    /// Weight of class `cls`.
    fn weight(&self, weights: Option<Buffer>, cls: &Expr) -> Expr {
        weights.map_or(Expr::F32(1.0), |w| w.load(cls))
    }

    /// Registers holding the row maximum and `sum exp(z - max)` of row `row`.
    fn softmax_terms(&self, b: &mut KernelBuilder, z: Buffer, row: &Expr) -> (Expr, Expr) {
        let k = int(self.classes);
        let max = b.let_("zmax", f32::NEG_INFINITY);
        b.for_("j", 0, k.clone(), 1, |b, j| {
            b.assign(&max, max.max(z.load(row * k.clone() + j)))
        });
        let total = b.let_("zsum", 0.0f32);
        b.for_("j", 0, k.clone(), 1, |b, j| {
            b.assign(&total, &total + (z.load(row * k.clone() + j) - &max).exp());
        });
        (max, total)
    }
}

fn loss_forward(loss: &Loss) -> Result<super::Launch> {
    let mut l = Lowering::new("softmax_cross_entropy", THREADS);
    l.doc(format!(
        "Mean softmax cross-entropy over labelled rows ({}), weighted by class and normalised by \
         the total weight. One block of {THREADS} threads: thread t takes rows t, t + {THREADS}, \
         ..., then two deterministic block reductions.",
        loss.describe()
    ));
    let z = l.operand("logits", 0);
    let labels = l.operand("labels", 1);
    let weights = loss.weights(&mut l);
    let out = l.result("loss");
    let n = l.batch();
    let scratch = l.shared("partial", THREADS as usize);
    let b = &mut *l;
    let tid = b.let_("tid", thread_idx(Axis::X));
    let rows = b.let_("rows", loss.rows(&n));
    let nll = b.let_("nll", 0.0f32);
    let wsum = b.let_("wsum", 0.0f32);
    b.for_("r", &tid, &rows, THREADS as i32, |b, r| {
        let label = b.let_("label", labels.load(&r));
        b.if_(loss.ignored(&label).logical_not(), |b| {
            b.if_else(
                loss.valid(&label),
                |b| {
                    let cls = b.let_("cls", label.cast(Ty::I32));
                    let (max, total) = loss.softmax_terms(b, z, &r);
                    let lse = b.let_("lse", max + total.log());
                    let w = b.let_("w", loss.weight(weights, &cls));
                    b.assign(
                        &nll,
                        &nll + &w * (lse - z.load(&r * int(loss.classes) + &cls)),
                    );
                    b.assign(&wsum, &wsum + w);
                },
                |b| b.assign(&nll, f32::NAN),
            );
        });
    });
    let sum_nll = block_sum(b, scratch, &tid, nll.clone());
    let sum_w = block_sum(b, scratch, &tid, wsum.clone());
    b.if_(tid.equals(0), |b| {
        b.store(
            out.mem(),
            0,
            sum_w.equals(0.0f32).select(0.0f32, sum_nll / &sum_w),
        );
    });
    l.finish()
}

/// Two launches: one block sums the class weights of the labelled rows into
/// scratch 0, then one thread per row writes that row's gradient.
fn loss_backward(loss: &Loss, weight: f32) -> Result<LoweredStep> {
    let mut l = Lowering::new("softmax_cross_entropy_weight", THREADS);
    l.doc(format!(
        "Total class weight of the labelled rows ({}), the normaliser of the loss gradient. One \
         block of {THREADS} threads with a deterministic block reduction.",
        loss.describe()
    ));
    let labels = l.operand("labels", 1);
    let weights = loss.weights(&mut l);
    let total = l.scratch("total_weight", 0, true);
    let n = l.batch();
    let scratch = l.shared("partial", THREADS as usize);
    let b = &mut *l;
    let tid = b.let_("tid", thread_idx(Axis::X));
    let rows = b.let_("rows", loss.rows(&n));
    let wsum = b.let_("wsum", 0.0f32);
    b.for_("r", &tid, &rows, THREADS as i32, |b, r| {
        let label = b.let_("label", labels.load(&r));
        b.if_(loss.ignored(&label).logical_not(), |b| {
            b.if_else(
                loss.valid(&label),
                |b| b.assign(&wsum, &wsum + loss.weight(weights, &label.cast(Ty::I32))),
                |b| b.assign(&wsum, f32::NAN),
            );
        });
    });
    let sum = block_sum(b, scratch, &tid, wsum.clone());
    b.if_(tid.equals(0), |b| b.store(total.mem(), 0, sum));
    let first = l.finish()?;

    let mut l = Lowering::new("softmax_cross_entropy_backward", THREADS);
    l.doc(format!(
        "{weight} * d(loss)/d(logits) ({}): row i gets w[y_i] * (softmax(z_i) - onehot(y_i)) / \
         total weight, ignored rows 0. One thread per row.",
        loss.describe()
    ));
    let z = l.operand("logits", 0);
    let labels = l.operand("labels", 1);
    let weights = loss.weights(&mut l);
    let total = l.scratch("total_weight", 0, false);
    let grad = l.result("grad");
    let n = l.batch();
    let k = loss.classes;
    l.per_element(loss.rows(&n), |b, r| {
        let label = b.let_("label", labels.load(&r));
        let total = b.let_("total", total.load(0));
        let skip = loss.ignored(&label).or(total.equals(0.0f32));
        b.if_else(
            skip,
            |b| {
                b.for_("j", 0, int(k), 1, |b, j| {
                    b.store(grad.mem(), &r * int(k) + j, 0.0f32)
                })
            },
            |b| {
                b.if_else(
                    loss.valid(&label),
                    |b| {
                        let cls = b.let_("cls", label.cast(Ty::I32));
                        let (max, sum) = loss.softmax_terms(b, z, &r);
                        let scale = b.let_("scale", loss.weight(weights, &cls) * weight / &total);
                        b.for_("j", 0, int(k), 1, |b, j| {
                            let p = (z.load(&r * int(k) + &j) - &max).exp() / &sum;
                            let onehot = j.equals(&cls).select(1.0f32, 0.0f32);
                            b.store(grad.mem(), &r * int(k) + &j, &scale * (p - onehot));
                        });
                    },
                    |b| {
                        b.for_("j", 0, int(k), 1, |b, j| {
                            b.store(grad.mem(), &r * int(k) + j, f32::NAN)
                        })
                    },
                );
            },
        );
    });
    Ok(LoweredStep {
        scratch: vec![1],
        launches: vec![first, l.finish()?],
    })
}

/// SGD with momentum and weight decay as PyTorch's `torch.optim.SGD` defines
/// it: `g = grad + wd * p`, `v = mu * v + g`, then `p -= lr * (g + mu * v)`
/// with Nesterov momentum or `p -= lr * v` without.
fn sgd(len: usize, momentum: f32, weight_decay: f32, nesterov: bool) -> Result<super::Launch> {
    let mut l = Lowering::new("sgd_update", THREADS);
    l.doc(format!(
        "In-place SGD over {len} parameters with momentum {momentum}, weight decay \
         {weight_decay}{}. One thread per parameter.",
        if nesterov { ", Nesterov" } else { "" }
    ));
    let param = l.operand_mut("param", 0);
    let grad = l.operand("grad", 1);
    let velocity = l.operand_mut("velocity", 2);
    let lr = l.learning_rate();
    l.per_element(int(len), |b, i| {
        let p = b.let_("p", param.load(&i));
        let g = b.let_("g", grad.load(&i) + weight_decay * &p);
        let v = b.let_("v", momentum * velocity.load(&i) + &g);
        b.store(velocity.mem(), &i, &v);
        let step = if nesterov { g + momentum * v } else { v };
        b.store(param.mem(), &i, p - lr * step);
    });
    l.finish()
}

/// RMSprop with weight decay: `g = grad + wd * p`,
/// `s = decay * s + (1 - decay) * g^2`, then `p -= lr * g / (sqrt(s) + eps)`.
fn rmsprop(len: usize, decay: f32, eps: f32, weight_decay: f32) -> Result<super::Launch> {
    let mut l = Lowering::new("rmsprop_update", THREADS);
    l.doc(format!(
        "In-place RMSprop over {len} parameters with decay {decay}, epsilon {eps} and weight \
         decay {weight_decay}. One thread per parameter."
    ));
    let param = l.operand_mut("param", 0);
    let grad = l.operand("grad", 1);
    let mean_square = l.operand_mut("mean_square", 2);
    let lr = l.learning_rate();
    l.per_element(int(len), |b, i| {
        let p = b.let_("p", param.load(&i));
        let g = b.let_("g", grad.load(&i) + weight_decay * &p);
        let s = b.let_("s", decay * mean_square.load(&i) + (1.0 - decay) * &g * &g);
        b.store(mean_square.mem(), &i, &s);
        b.store(param.mem(), &i, p - lr * g / (s.sqrt() + eps));
    });
    l.finish()
}

/// `running = (1 - m) * running + m * batch`, with the variance made unbiased
/// by `count / (count - 1)` where `count = n * per_item`.
fn running_update(c: usize, momentum: f32, per_item: usize) -> Result<super::Launch> {
    let mut l = Lowering::new("bn_running_update", THREADS);
    l.doc(format!(
        "Running mean and unbiased variance of {c} channels with momentum {momentum}. One thread \
         per channel."
    ));
    let running = l.operand_mut("running", 0);
    let stats = l.operand("stats", 1);
    let n = l.batch();
    let keep = 1.0 - momentum;
    l.per_element(int(c), |b, i| {
        let count = b.let_("count", &n * int(per_item));
        let correction = b.let_(
            "correction",
            count
                .gt(1)
                .select(count.to_f32() / (&count - 1).to_f32(), 1.0f32),
        );
        b.store(
            running.mem(),
            &i,
            keep * running.load(&i) + momentum * stats.load(&i),
        );
        let var = &i + int(c);
        let batch_var = momentum * stats.load(&var) * correction;
        b.store(running.mem(), &var, keep * running.load(&var) + batch_var);
    });
    l.finish()
}
