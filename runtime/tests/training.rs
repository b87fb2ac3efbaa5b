//! Whole-network tests of the training pipeline: autodiff gradients against
//! finite differences, overfitting real images, and exact kill-and-resume.

use ldnc_codegen::cpu::lower;
use ldnc_ir::program::{CompiledNet, Program, FORMAT_VERSION};
use ldnc_ir::spec::NetSpec;
use ldnc_passes::{memory, pipeline};
use ldnc_runtime::exec::{Executor, StepParams};
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::store::Store;

/// The CLI's pipeline without fusion: expand, differentiate, plan, lower.
fn compile(spec: &NetSpec) -> CompiledNet {
    let options = pipeline::Options {
        fuse: false,
        ..Default::default()
    };
    let planned = pipeline::training(spec, &options).unwrap().planned;
    memory::verify(&planned.graph, &planned.schedule).unwrap();
    let train = lower(&planned.graph, &planned.schedule, &planned.roots);
    let planned = pipeline::evaluation(spec, &options).unwrap();
    let eval = lower(&planned.graph, &planned.schedule, &planned.roots);
    CompiledNet {
        format_version: FORMAT_VERSION,
        spec: spec.clone(),
        train,
        eval,
    }
}

fn spec(text: &str) -> NetSpec {
    let spec = NetSpec::from_ron(text, "test").unwrap();
    spec.validate().unwrap();
    spec
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Loss of the training program at the store's current parameters, with the
/// running statistics left untouched (they do not enter the training loss).
fn loss_at(program: &Program, store: &Store, images: &[f32], labels: &[f32], n: usize) -> f64 {
    let mut exec = Executor::new(program.clone(), n, KernelSet::Reference).unwrap();
    let mut scratch = store.clone();
    exec.run(
        &mut scratch,
        images,
        labels,
        n,
        StepParams { lr: 0.0, seed: 1 },
    )
    .unwrap();
    exec.loss(&scratch).unwrap() as f64
}

fn check_gradients(text: &str) {
    let spec = spec(text);
    let compiled = compile(&spec);
    let n = 4;
    let input = spec.input;
    let images = noise(n * input.height * input.width * input.channels, 3);
    let labels: Vec<f32> = (0..n).map(|i| (i % spec.classes) as f32).collect();
    let store = Store::init(&[&compiled.train], 11);

    // With lr = 0, zero weight decay and fresh velocities, one step leaves each
    // parameter's velocity equal to its gradient.
    let mut exec = Executor::new(compiled.train.clone(), n, KernelSet::Reference).unwrap();
    let mut after = store.clone();
    exec.run(
        &mut after,
        &images,
        &labels,
        n,
        StepParams { lr: 0.0, seed: 1 },
    )
    .unwrap();

    let mut checked = 0;
    for (name, entry) in &store.entries {
        if entry.role != ldnc_ir::Role::Param {
            continue;
        }
        let grad = after.get(&format!("{name}.velocity")).unwrap().to_vec();
        let picks = [0, entry.data.len() / 2, entry.data.len() - 1];
        for &k in &picks {
            // ReLU kinks are dense in a network this small, so a step of either sign
            // may cross one. Where it does, the one-sided slopes differ and autodiff
            // matches the side without a kink; the entry passes if the left, right
            // or central difference agrees.
            let analytic = grad[k] as f64;
            let eps = 1e-3f32;
            let at = |delta: f32| {
                let mut moved = store.clone();
                moved.get_mut(name).unwrap()[k] += delta;
                loss_at(&compiled.train, &moved, &images, &labels, n)
            };
            let (minus, zero, plus) = (at(-eps), at(0.0), at(eps));
            let e = eps as f64;
            let estimates = [
                (plus - zero) / e,
                (zero - minus) / e,
                (plus - minus) / (2.0 * e),
            ];
            let agrees =
                |fd: &f64| (fd - analytic).abs() <= 0.05 * fd.abs().max(analytic.abs()) + 3e-4;
            assert!(
                estimates.iter().any(agrees),
                "{name}[{k}]: autodiff {analytic:.6}, right/left/central differences {estimates:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} entries checked");
}

fn with_zero_decay(body: &str) -> String {
    format!("({body}, train: (weight_decay: 0.0, momentum: 0.0))")
}

#[test]
fn gradients_log_densenet_v1() {
    check_gradients(&with_zero_decay(
        "blocks: [2, 2], growth: 3, bottleneck: Some(2), input: (height: 6, width: 6, \
         channels: 2), classes: 3, deep_supervision: true",
    ));
}

#[test]
fn gradients_v2_and_classic_transitions() {
    check_gradients(&with_zero_decay(
        "blocks: [2, 2], growth: 3, bottleneck: None, transition: BlockCompression, \
         input: (height: 4, width: 4, channels: 1), classes: 3",
    ));
    check_gradients(&with_zero_decay(
        "template: DenseNet, blocks: [2, 2], growth: 3, transition: Classic(compression: 0.5), \
         input: (height: 4, width: 4, channels: 1), classes: 3",
    ));
}

#[test]
fn gradients_imagenet_stem() {
    check_gradients(&with_zero_decay(
        "blocks: [2], growth: 2, bottleneck: None, stem: ImageNet, init_channels: 4, \
         input: (height: 9, width: 9, channels: 1), classes: 2",
    ));
}

#[test]
fn fast_and_reference_programs_agree() {
    let spec = spec(
        "(blocks: [3, 3], growth: 4, input: (height: 8, width: 8, channels: 3), classes: 5, \
         deep_supervision: true, dropout: 0.2)",
    );
    let compiled = compile(&spec);
    let n = 6;
    let images = noise(n * 8 * 8 * 3, 5);
    let labels: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
    let mut stores = Vec::new();
    for kernels in [KernelSet::Reference, KernelSet::Fast] {
        let mut store = Store::init(&[&compiled.train], 2);
        let mut exec = Executor::new(compiled.train.clone(), n, kernels).unwrap();
        for step in 0..3 {
            exec.run(
                &mut store,
                &images,
                &labels,
                n,
                StepParams {
                    lr: 0.05,
                    seed: step,
                },
            )
            .unwrap();
        }
        stores.push(store);
    }
    for (name, reference) in &stores[0].entries {
        let fast = &stores[1].entries[name];
        for (a, b) in reference.data.iter().zip(&fast.data) {
            assert!(
                (a - b).abs() <= 1e-3 * (1.0 + a.abs()),
                "{name}: {a} vs {b}"
            );
        }
    }
}
