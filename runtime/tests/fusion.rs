//! The fusion pass and the memory planner checked by execution: fused and
//! unfused programs of random small networks of every template train to the
//! same weights, batch-norm running statistics are updated once per step, every
//! example's plan passes the independent checker, the planned bytes are what
//! the executor allocates, and frozen and exported evaluation programs give the
//! logits of the programs they came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ldnc_codegen::cpu::lower;
use ldnc_ir::program::Program;
use ldnc_ir::spec::NetSpec;
use ldnc_ir::Op;
use ldnc_passes::memory;
use ldnc_passes::pipeline::{self, Planned};
use ldnc_runtime::exec::{Executor, StepParams};
use ldnc_runtime::export;
use ldnc_runtime::freeze::freeze;
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::store::Store;
use proptest::prelude::*;

/// Compiles the training graph of `spec` as the CLI does and checks its plan.
fn planned_training(spec: &NetSpec, fused: bool) -> Planned {
    let options = pipeline::Options {
        fuse: fused,
        ..Default::default()
    };
    let planned = pipeline::training(spec, &options).unwrap().planned;
    memory::verify(&planned.graph, &planned.schedule).unwrap();
    planned
}

fn training_program(spec: &NetSpec, fused: bool) -> Program {
    let planned = planned_training(spec, fused);
    lower(&planned.graph, &planned.schedule, &planned.roots)
}

/// Compiles the training program of `spec` with one buffer per value, so every
/// value of a step can be read after it.
fn unshared_training_program(spec: &NetSpec, fused: bool) -> Program {
    let options = pipeline::Options {
        fuse: fused,
        plan_memory: false,
        ..Default::default()
    };
    let planned = pipeline::training(spec, &options).unwrap().planned;
    lower(&planned.graph, &planned.schedule, &planned.roots)
}

/// Gradient of every parameter after the last step, by parameter name: the
/// second operand of the parameter's SGD update.
fn gradients(exec: &Executor, store: &Store) -> BTreeMap<String, Vec<f32>> {
    let program = exec.program();
    program
        .steps
        .iter()
        .filter(|step| matches!(step.op, Op::SgdUpdate { .. }))
        .map(|step| {
            let name = program.values[step.inputs[0]].name.clone();
            let grad = exec.value(store, step.inputs[1]).unwrap().to_vec();
            (name, grad)
        })
        .collect()
}

fn assert_close(what: &str, unfused: &[f32], fused: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(unfused.len(), fused.len(), "{} lengths", what);
    for (i, (a, b)) in unfused.iter().zip(fused).enumerate() {
        prop_assert!(
            (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
            "{}[{}]: unfused {} vs fused {}",
            what,
            i,
            a,
            b
        );
    }
    Ok(())
}

const TEMPLATES: [&str; 8] = [
    "DenseNet",
    "LogDenseNet",
    "LogLogDenseNet(min_inputs: 2)",
    "Nearest(count: Log)",
    "Nearest(count: Half)",
    "EvenlySpaced(count: Half)",
    "NearestHalfAndLog()",
    "NearestHalfAndLog(chain: AuthorsCode)",
];

const TRANSITIONS: [&str; 3] = [
    "Independent",
    "BlockCompression",
    "Classic(compression: 0.5)",
];

fn small_spec(template: usize, transition: usize, bottleneck: bool, supervise: bool) -> NetSpec {
    let text = format!(
        "(template: {}, transition: {}, blocks: [3, 2], growth: 3, bottleneck: {}, \
         input: (height: 6, width: 6, channels: 2), classes: 3, deep_supervision: {supervise})",
        TEMPLATES[template],
        TRANSITIONS[transition],
        if bottleneck { "Some(2)" } else { "None" },
    );
    let spec = NetSpec::from_ron(&text, "random").unwrap();
    spec.validate().unwrap();
    spec
}

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn fused_and_unfused_train_alike(
        template in 0..TEMPLATES.len(),
        transition in 0..TRANSITIONS.len(),
        bottleneck in any::<bool>(),
        supervise in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let spec = small_spec(template, transition, bottleneck, supervise);
        let n = 4;
        let images = noise(n * 6 * 6 * 2, seed);
        let labels: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        let mut stores = Vec::new();
        let mut losses = Vec::new();
        for fused in [false, true] {
            let program = training_program(&spec, fused);
            let mut store = Store::init(&[&program], seed);
            let mut exec = Executor::new(program, n, KernelSet::Reference).unwrap();
            for step in 0..2 {
                exec.run(&mut store, &images, &labels, n, StepParams { lr: 0.05, seed: step }).unwrap();
            }
            losses.push(exec.loss(&store).unwrap());
            stores.push(store);
        }
        prop_assert!((losses[0] - losses[1]).abs() <= 1e-4 * (1.0 + losses[0].abs()),
            "losses {losses:?}");
        prop_assert_eq!(stores[0].entries.len(), stores[1].entries.len());
        for (name, unfused) in &stores[0].entries {
            let fused = &stores[1].entries[name];
            for (a, b) in unfused.data.iter().zip(&fused.data) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{}: {} vs {}", name, a, b);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// One step of the fused and the unfused program from the same weights:
    /// the loss, every head's logits and every parameter's gradient agree, so
    /// the forward and the backward rewrites preserve values.
    #[test]
    fn fused_and_unfused_gradients_agree(
        template in 0..TEMPLATES.len(),
        transition in 0..TRANSITIONS.len(),
        bottleneck in any::<bool>(),
        supervise in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let spec = small_spec(template, transition, bottleneck, supervise);
        let n = 3;
        let images = noise(n * 6 * 6 * 2, seed);
        let labels: Vec<f32> = (0..n).map(|i| ((i + 1) % 3) as f32).collect();
        let mut runs = Vec::new();
        for fused in [false, true] {
            let program = unshared_training_program(&spec, fused);
            let mut store = Store::init(&[&program], seed);
            let mut exec = Executor::new(program, n, KernelSet::Reference).unwrap();
            exec.run(&mut store, &images, &labels, n, StepParams { lr: 0.05, seed: 0 }).unwrap();
            let loss = exec.loss(&store).unwrap();
            let logits: Vec<Vec<f32>> = exec
                .program()
                .logits
                .iter()
                .map(|&id| exec.value(&store, id).unwrap().to_vec())
                .collect();
            runs.push((loss, logits, gradients(&exec, &store)));
        }
        let (unfused, fused) = (&runs[0], &runs[1]);
        assert_close("loss", &[unfused.0], &[fused.0])?;
        prop_assert_eq!(unfused.1.len(), fused.1.len());
        for (head, (a, b)) in unfused.1.iter().zip(&fused.1).enumerate() {
            assert_close(&format!("logits of head {head}"), a, b)?;
        }
        prop_assert_eq!(unfused.2.len(), fused.2.len());
        for (name, grad) in &unfused.2 {
            assert_close(&format!("gradient of {name}"), grad, &fused.2[name])?;
        }
    }
}

/// No backward step of the fused training program of any template reads a
/// concatenation, BN or ReLU output, and no ReLU-backward mask is stored. The
/// fused backward ops recompute those from the layer outputs, so none of them
/// lives from the forward into the backward pass. The backward pass starts at
/// the first softmax cross-entropy gradient, because the fused graph keeps
/// autodiff's order.
#[test]
fn backward_reads_no_chain_values() {
    let cases = (0..TEMPLATES.len())
        .flat_map(|t| (0..TRANSITIONS.len()).map(move |tr| (t, tr)))
        .flat_map(|(t, tr)| [(t, tr, false), (t, tr, true)]);
    for (template, transition, bottleneck) in cases {
        let case = format!(
            "{} with {} transitions (bottleneck {bottleneck})",
            TEMPLATES[template], TRANSITIONS[transition]
        );
        let spec = small_spec(template, transition, bottleneck, true);
        let program = training_program(&spec, true);
        let mut writer = vec![None; program.values.len()];
        for step in &program.steps {
            writer[step.output] = Some(&step.op);
        }
        let is_chain = |value: usize| {
            matches!(
                writer[value],
                Some(Op::Concat | Op::BnApply { .. } | Op::Relu | Op::ReluBackward)
            )
        };
        let backward_start = program
            .steps
            .iter()
            .position(|step| matches!(step.op, Op::SoftmaxCrossEntropyBackward { .. }))
            .expect("a training program has a loss gradient");

        for step in &program.steps[backward_start..] {
            let read: Vec<&str> = step
                .inputs
                .iter()
                .filter(|&&v| is_chain(v))
                .map(|&v| program.values[v].name.as_str())
                .collect();
            assert!(read.is_empty(), "{case}: {} reads {read:?}", step.op.name());
        }
        let masks = program
            .steps
            .iter()
            .filter(|step| matches!(step.op, Op::ReluBackward))
            .count();
        assert_eq!(masks, 0, "{case}");
        // Each input's gradient is computed on its own, never sliced out of
        // the gradient of a whole concatenation.
        for step in &program.steps {
            if let Op::Slice { .. } = step.op {
                let read = writer[step.inputs[0]].map(|op| op.name());
                assert_ne!(read, Some("bn_relu_backward"), "{case}");
            }
        }
        let fused_backward = program
            .steps
            .iter()
            .filter(|step| {
                matches!(
                    step.op,
                    Op::BnReluBackward { .. } | Op::BnReluConvBackwardFilter { .. }
                )
            })
            .count();
        assert!(fused_backward > 0, "{case}");
    }
}

#[test]
fn running_statistics_update_once_per_step() {
    let spec = small_spec(0, 2, true, true);
    let program = training_program(&spec, true);
    let states: Vec<&str> = program
        .persistent()
        .filter(|v| v.role == ldnc_ir::Role::State)
        .map(|v| v.name.as_str())
        .collect();
    assert!(!states.is_empty());
    for state in states {
        let writers = program
            .steps
            .iter()
            .filter(|s| matches!(s.op, Op::BnRunningUpdate { .. }))
            .filter(|s| program.values[s.inputs[0]].name == state)
            .count();
        assert_eq!(writers, 1, "{state} is updated {writers} times per step");
    }
    // Recomputing the normalised input in the backward pass never reads the
    // running statistics.
    for step in &program.steps {
        if matches!(
            step.op,
            Op::BnReluBackward { .. }
                | Op::BnReluBackwardPart { .. }
                | Op::BnReluConvBackwardFilter { .. }
        ) {
            for &i in &step.inputs {
                assert_ne!(program.values[i].role, ldnc_ir::Role::State);
            }
        }
    }
}

#[test]
fn every_example_plan_passes_the_checker() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "ron") {
            continue;
        }
        let spec = NetSpec::load(&path, &[]).unwrap();
        for fuse in [false, true] {
            let options = pipeline::Options {
                fuse,
                ..Default::default()
            };
            let planned = pipeline::training(&spec, &options).unwrap().planned;
            memory::verify(&planned.graph, &planned.schedule)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        checked += 1;
    }
    assert!(checked >= 18);
}

#[test]
fn planned_bytes_are_what_the_executor_allocates() {
    let spec = NetSpec::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.ron"),
        &[],
    )
    .unwrap();
    let program = training_program(&spec, true);
    for batch in [1, 7, 64] {
        let planned = program.buffer_bytes(batch);
        let exec = Executor::new(program.clone(), batch, KernelSet::Fast).unwrap();
        assert_eq!(exec.buffer_bytes(), planned);
    }
}

/// The evaluation program of `spec` as the CLI compiles it, after the
/// planner checker.
fn eval_program(spec: &NetSpec, fused: bool) -> Program {
    let options = pipeline::Options {
        fuse: fused,
        ..Default::default()
    };
    let planned = pipeline::evaluation(spec, &options).unwrap();
    memory::verify(&planned.graph, &planned.schedule).unwrap();
    lower(&planned.graph, &planned.schedule, &planned.roots)
}

/// Runs the evaluation `program` once on `images` and returns every head's
/// logits.
fn head_logits(
    program: Program,
    store: &mut Store,
    images: &[f32],
    labels: &[f32],
) -> Vec<Vec<f32>> {
    let n = labels.len();
    let heads = program.logits.clone();
    let mut exec = Executor::new(program, n, KernelSet::Reference).unwrap();
    let params = StepParams { lr: 0.0, seed: 0 };
    exec.run(store, images, labels, n, params).unwrap();
    heads
        .iter()
        .map(|&h| exec.value(store, h).unwrap().to_vec())
        .collect()
}

/// Draws every running statistic and batch-norm affine parameter, because
/// their initial values (mean 0, variance 1, gamma 1, beta 0) make an
/// evaluation-mode batch norm nearly the identity and would hide a wrong fold.
fn randomise_batch_norm(store: &mut Store, seed: u64) {
    for (i, (name, entry)) in store.entries.iter_mut().enumerate() {
        let c = entry.data.len() / 2;
        let drawn = noise(2 * c, seed + i as u64);
        match entry.role {
            ldnc_ir::Role::State => {
                entry.data[..c].copy_from_slice(&drawn[..c]);
                for (var, v) in entry.data[c..].iter_mut().zip(&drawn[c..]) {
                    *var = 0.5 + v.abs();
                }
            }
            ldnc_ir::Role::Param if name.ends_with(".affine") => {
                for (gamma, v) in entry.data[..c].iter_mut().zip(&drawn[..c]) {
                    *gamma = 1.0 + 0.5 * v;
                }
                entry.data[c..].copy_from_slice(&drawn[c..]);
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn folded_and_unfolded_evaluate_alike(
        template in 0..TEMPLATES.len(),
        transition in 0..TRANSITIONS.len(),
        bottleneck in any::<bool>(),
        supervise in any::<bool>(),
        plain_stem in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let mut spec = small_spec(template, transition, bottleneck, supervise);
        if plain_stem {
            spec.stem = ldnc_ir::spec::Stem::Plain;
        }
        let n = 3;
        let images = noise(n * 6 * 6 * 2, seed);
        let labels: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        let unfolded = eval_program(&spec, false);
        let folded = eval_program(&spec, true);
        let folds = folded
            .steps
            .iter()
            .filter(|s| matches!(s.op, Op::Conv2dBias { .. } | Op::BnReluConvBias { .. }))
            .count();
        if bottleneck || plain_stem {
            prop_assert!(folds > 0, "a conv followed by batch norm was not folded");
        }

        let mut store = Store::init(&[&unfolded], seed);
        randomise_batch_norm(&mut store, seed);
        let logits: Vec<Vec<Vec<f32>>> = [unfolded, folded]
            .into_iter()
            .map(|program| head_logits(program, &mut store, &images, &labels))
            .collect();
        prop_assert_eq!(logits[0].len(), logits[1].len());
        for (unfolded, folded) in logits[0].iter().zip(&logits[1]) {
            for (a, b) in unfolded.iter().zip(folded) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{} vs {}", a, b);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Freezing runs the batch-norm folds once and drops their steps. The
    /// frozen program gives the same logits, bit for bit, as the program it
    /// came from, and an export of it loads back unchanged.
    #[test]
    fn frozen_evaluates_like_folded(
        template in 0..TEMPLATES.len(),
        transition in 0..TRANSITIONS.len(),
        supervise in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let spec = small_spec(template, transition, true, supervise);
        let n = 2;
        let images = noise(n * 6 * 6 * 2, seed);
        let labels: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        let folded = eval_program(&spec, true);
        let is_fold = |op: &Op| matches!(op, Op::BnFoldWeight { .. } | Op::BnFoldBias { .. });
        let folds = folded.steps.iter().filter(|s| is_fold(&s.op)).count();
        prop_assert!(folds > 0, "no batch norm was folded");

        let mut store = Store::init(&[&folded], seed);
        randomise_batch_norm(&mut store, seed);
        let frozen = freeze(&folded, &store, KernelSet::Reference).unwrap();
        prop_assert_eq!(frozen.precomputed.len(), folds);
        prop_assert!(frozen.program.steps.iter().all(|s| !is_fold(&s.op)));
        prop_assert_eq!(frozen.program.steps.len(), folded.steps.len() - folds);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.safetensors");
        export::save(&path, &spec, &frozen, 3, true).unwrap();
        let loaded = export::load(&path).unwrap();
        prop_assert_eq!(&loaded.frozen.program, &frozen.program);
        prop_assert_eq!(&loaded.frozen.store, &frozen.store);
        prop_assert_eq!(&loaded.spec, &spec);
        prop_assert_eq!(loaded.epoch, 3);
        prop_assert!(loaded.fused);

        let mut frozen_store = loaded.frozen.store;
        let logits = [
            head_logits(folded, &mut store, &images, &labels),
            head_logits(loaded.frozen.program, &mut frozen_store, &images, &labels),
        ];
        prop_assert_eq!(&logits[0], &logits[1]);
    }
}
