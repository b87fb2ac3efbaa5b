//! Training on real images: a tiny network overfits a handful of bundled
//! Fashion-MNIST images, and an interrupted run resumed from its checkpoint ends
//! with exactly the weights of an uninterrupted run.

use std::path::PathBuf;

use ldnc_codegen::cpu::lower;
use ldnc_ir::program::{CompiledNet, FORMAT_VERSION};
use ldnc_ir::spec::{LrSchedule, NetSpec, Optimizer};
use ldnc_ir::Role;
use ldnc_passes::pipeline;
use ldnc_runtime::checkpoint;
use ldnc_runtime::data::{self, DataSpec, Dataset, Split};
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::train::{self, Position, RunFiles, Session, TrainConfig};

/// The CLI's pipeline with fusion: expand, differentiate, fuse, plan, lower.
fn compile(spec: &NetSpec) -> CompiledNet {
    let options = pipeline::Options::default();
    let planned = pipeline::training(spec, &options).unwrap().planned;
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

fn bundled() -> Dataset {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist");
    let spec = DataSpec::parse(&format!("fashion-mnist:{}", dir.display())).unwrap();
    data::load(&spec).unwrap()
}

fn head(split: &Split, n: usize) -> Split {
    let size = split.image_size();
    Split {
        images: split.images[..n * size].to_vec(),
        labels: split.labels[..n].to_vec(),
        len: n,
        ..split.clone()
    }
}

/// The bundled data cut to `train` and `test` images.
fn small(train: usize, test: usize) -> Dataset {
    let full = bundled();
    let mut d = full.clone();
    d.train = head(&full.train, train);
    d.test = head(&full.test, test);
    d
}

fn tiny_spec() -> NetSpec {
    let spec = NetSpec::from_ron(
        "(blocks: [2, 2], growth: 6, bottleneck: None, init_channels: 8,
          input: (height: 28, width: 28, channels: 1), classes: 10,
          train: (crop_padding: 0, flip: false))",
        "tiny",
    )
    .unwrap();
    spec.validate().unwrap();
    spec
}

fn config(epochs: usize, batch: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch,
        lr,
        schedule: LrSchedule::Constant,
        seed: 5,
        crop_padding: 0,
        flip: false,
        max_steps: None,
        show_progress: false,
    }
}

#[test]
fn tiny_network_overfits_real_images() {
    let data = small(32, 32);
    let spec = tiny_spec()
        .with_overrides(&[
            "growth=12".into(),
            "init_channels=16".into(),
            "blocks=[3, 3]".into(),
        ])
        .unwrap();
    let config = config(100, 32, 0.1);
    let mut session = Session::new(compile(&spec), config.batch, KernelSet::Fast, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = RunFiles {
        dir: dir.path().to_path_buf(),
    };
    let history = train::train(&mut session, &data, &config, &files, Position::default()).unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.train_accuracy, 1.0, "final epoch: {last:?}");
    assert!(files.curves().exists());
    assert_eq!(train::read_metrics(&files.metrics()).len(), 100);
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    assert_resume_exact(&tiny_spec(), config(3, 16, 0.05));
}

#[test]
fn resumed_rmsprop_run_matches_uninterrupted_run() {
    let mut spec = tiny_spec();
    spec.train.optimizer = Optimizer::RmsProp {
        decay: 0.9,
        eps: 1e-6,
    };
    let mut full = config(3, 16, 1e-3);
    full.schedule = LrSchedule::Exponential { decay: 0.9 };
    assert_resume_exact(&spec, full);
}

/// Trains `spec` straight through `full`, and again with a stop in the
/// second epoch and a resume from the first epoch's checkpoint, and checks
/// that both end with the same bits in every tensor, optimizer state included.
fn assert_resume_exact(spec: &NetSpec, full: TrainConfig) {
    let data = small(48, 16);
    let compiled = compile(spec);

    let straight_dir = tempfile::tempdir().unwrap();
    let straight_files = RunFiles {
        dir: straight_dir.path().to_path_buf(),
    };
    let mut straight = Session::new(compiled.clone(), 16, KernelSet::Reference, 9).unwrap();
    train::train(
        &mut straight,
        &data,
        &full,
        &straight_files,
        Position::default(),
    )
    .unwrap();

    // Stop in the middle of the second epoch, as a crash would, then continue
    // from the checkpoint written after the first.
    let broken_dir = tempfile::tempdir().unwrap();
    let broken_files = RunFiles {
        dir: broken_dir.path().to_path_buf(),
    };
    let mut interrupted = full.clone();
    interrupted.max_steps = Some(4);
    let mut first = Session::new(compiled.clone(), 16, KernelSet::Reference, 9).unwrap();
    train::train(
        &mut first,
        &data,
        &interrupted,
        &broken_files,
        Position::default(),
    )
    .unwrap();

    let path = broken_files.checkpoint();
    let (tensors, meta) = checkpoint::load(&path).unwrap();
    assert_eq!(meta.epoch, 1);
    let mut resumed = Session::new(compiled, 16, KernelSet::Reference, 123).unwrap();
    checkpoint::restore(&path, &mut resumed.store, tensors).unwrap();
    let start = Position {
        epoch: meta.epoch,
        step: meta.step,
    };
    train::train(&mut resumed, &data, &full, &broken_files, start).unwrap();

    let optimizer_state = straight
        .store
        .entries
        .values()
        .filter(|entry| entry.role == Role::OptState)
        .count();
    assert!(optimizer_state > 0, "the optimizer keeps state");
    assert_eq!(straight.store.entries.len(), resumed.store.entries.len());
    for (name, entry) in &straight.store.entries {
        assert_eq!(
            entry.data, resumed.store.entries[name].data,
            "{name} differs"
        );
    }
}

#[test]
fn checkpoint_of_another_network_is_rejected() {
    let spec = tiny_spec();
    let compiled = compile(&spec);
    let session = Session::new(compiled, 4, KernelSet::Fast, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let meta = checkpoint::Meta {
        network: "tiny".into(),
        spec_json: "{}".into(),
        epoch: 0,
        step: 0,
        seed: 0,
        config_json: "{}".into(),
    };
    checkpoint::save(&path, &session.store, &meta).unwrap();

    let other = spec.with_overrides(&["growth=7".into()]).unwrap();
    let mut second = Session::new(compile(&other), 4, KernelSet::Fast, 1).unwrap();
    let (tensors, _) = checkpoint::load(&path).unwrap();
    let err = checkpoint::restore(&path, &mut second.store, tensors).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("another network"), "{text}");
    assert!(text.contains("shape"), "{text}");
}

#[test]
fn zero_batch_rejected_before_output() {
    let data = small(8, 4);
    let mut session = Session::new(compile(&tiny_spec()), 4, KernelSet::Fast, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = RunFiles {
        dir: dir.path().join("run"),
    };
    for (epochs, batch) in [(1, 0), (0, 4)] {
        let config = config(epochs, batch, 0.1);
        let err = train::train(&mut session, &data, &config, &files, Position::default());
        let text = err.unwrap_err().to_string();
        assert!(text.contains("must be at least 1"), "{text}");
        assert!(!files.dir.exists(), "the output folder was created");
    }
}
