//! The class-weighted loss of segmentation on a CamVid fixture: training sets
//! the loss weights from the train split's median-frequency balance, the loss
//! the network computes is weighted by them, and checkpoints keep them.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use ldnc_codegen::cpu::lower;
use ldnc_ir::program::{CompiledNet, FORMAT_VERSION};
use ldnc_ir::spec::{LrSchedule, NetSpec};
use ldnc_ir::CLASS_WEIGHTS;
use ldnc_passes::pipeline;
use ldnc_runtime::checkpoint;
use ldnc_runtime::data::{self, Augment, BatchConfig, Batcher, DataSpec, Dataset};
use ldnc_runtime::exec::{Executor, StepParams};
use ldnc_runtime::kernels::KernelSet;
use ldnc_runtime::store::Store;
use ldnc_runtime::train::{self, Data, Pipeline, Position, RunFiles, Session, TrainConfig};

/// Label of pixel (x, y) in image `i`: mostly class 0, stripes of 1 and 2,
/// and void (11) in one corner, so the median-frequency weights differ.
fn label(i: u32, x: u32, y: u32) -> u8 {
    match (x + i) % 8 {
        _ if x < 2 && y < 2 => 11,
        0 => 1,
        1 if y.is_multiple_of(2) => 2,
        _ => 0,
    }
}

fn write_split(root: &Path, split: &str, count: u32) {
    std::fs::create_dir_all(root.join(split)).expect("mkdir");
    std::fs::create_dir_all(root.join(format!("{split}annot"))).expect("mkdir");
    for i in 0..count {
        let image = RgbImage::from_fn(20, 18, |x, y| {
            Rgb([label(i, x, y) * 20, x as u8 * 10, y as u8 * 12])
        });
        let labels = GrayImage::from_fn(20, 18, |x, y| Luma([label(i, x, y)]));
        let name = format!("{split}_{i:03}.png");
        image
            .save(root.join(split).join(&name))
            .expect("save image");
        labels
            .save(root.join(format!("{split}annot")).join(&name))
            .expect("save labels");
    }
}

fn camvid(root: &Path) -> Dataset {
    write_split(root, "train", 4);
    write_split(root, "val", 1);
    write_split(root, "test", 2);
    let spec = DataSpec::parse(&format!("camvid:{}", root.display())).expect("spec");
    data::load(&spec).expect("CamVid fixture")
}

/// Loads a 3-block FC-DenseNet for 16x16 crops with one loss head.
fn spec() -> NetSpec {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/fc-densenet-103-camvid.ron");
    let overrides: Vec<String> = [
        "blocks=[1,1,1]",
        "growth=2",
        "init_channels=4",
        "input.height=16",
        "input.width=16",
        "dropout=0.0",
        "deep_supervision=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    NetSpec::load(&path, &overrides).expect("example with overrides")
}

fn compile(spec: &NetSpec) -> CompiledNet {
    let options = pipeline::Options::default();
    let planned = pipeline::training(spec, &options)
        .expect("train pipeline")
        .planned;
    let train = lower(&planned.graph, &planned.schedule, &planned.roots);
    let planned = pipeline::evaluation(spec, &options).expect("eval pipeline");
    let eval = lower(&planned.graph, &planned.schedule, &planned.roots);
    CompiledNet {
        format_version: FORMAT_VERSION,
        spec: spec.clone(),
        train,
        eval,
    }
}

/// Computes the mean negative log-likelihood of `labels` under `logits`, with
/// each labelled pixel weighted by `weights[label]`. Pixels labelled `ignore`
/// are skipped.
fn weighted_nll(logits: &[f32], labels: &[f32], weights: &[f32], ignore: f32) -> f64 {
    let classes = weights.len();
    let (mut sum, mut total) = (0.0f64, 0.0f64);
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        if label == ignore {
            continue;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_sum = row
            .iter()
            .map(|&z| (z as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        let weight = weights[label as usize] as f64;
        sum += weight * (log_sum - row[label as usize] as f64);
        total += weight;
    }
    sum / total
}

#[test]
fn camvid_loss_is_class_weighted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dataset = camvid(dir.path());
    let weights = dataset
        .class_weights
        .clone()
        .expect("median-frequency weights");
    assert!(
        weights.iter().any(|&w| (w - 1.0).abs() > 0.2),
        "the fixture's classes are unbalanced: {weights:?}"
    );

    let compiled = compile(&spec());
    let mut store = Store::init(&[&compiled.train, &compiled.eval], 3);
    assert_eq!(
        store.get(CLASS_WEIGHTS),
        Some(&[1.0; 11][..]),
        "ones until set"
    );
    store
        .get_mut(CLASS_WEIGHTS)
        .expect("segmentation nets have class weights")
        .copy_from_slice(&weights);
    let mut config = BatchConfig::eval(2);
    config.augment = Augment::RandomCrop { size: 16 };
    config.ignore_label = dataset.ignore_label;
    let batch = Batcher::new(&dataset.test, &dataset.normalization(), &config, 0)
        .next()
        .expect("one batch");

    let mut eval = Executor::new(compiled.eval.clone(), 2, KernelSet::Reference).expect("eval");
    let params = StepParams { lr: 0.0, seed: 0 };
    eval.run(&mut store, &batch.images, &batch.labels, batch.len, params)
        .expect("eval step");
    let loss = eval.loss(&store).expect("loss") as f64;
    let logits = eval.final_logits(&store).expect("logits");
    let weighted = weighted_nll(logits, &batch.labels, &weights, 11.0);
    let plain = weighted_nll(logits, &batch.labels, &[1.0; 11], 11.0);
    assert!(
        (loss - weighted).abs() < 1e-4,
        "loss {loss}, weighted {weighted}"
    );
    assert!(
        (loss - plain).abs() > 1e-3,
        "loss {loss} must differ from the unweighted {plain}"
    );
}

#[test]
fn training_sets_and_keeps_class_weights() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dataset = camvid(&dir.path().join("camvid"));
    let weights = dataset
        .class_weights
        .clone()
        .expect("median-frequency weights");
    let spec = spec();
    let config = TrainConfig {
        epochs: 1,
        batch: 2,
        lr: 0.01,
        schedule: LrSchedule::Constant,
        seed: 1,
        crop_padding: 0,
        flip: true,
        max_steps: None,
        show_progress: false,
    };
    let data = Data::Memory(&dataset);
    let pipeline = Pipeline::for_dataset(
        data::DatasetKind::CamVid,
        spec.input,
        config.crop_padding,
        config.flip,
    )
    .expect("square input");
    let files = RunFiles {
        dir: dir.path().join("run"),
    };
    let mut session =
        Session::new(compile(&spec), config.batch, KernelSet::Fast, config.seed).expect("session");
    train::train_with(
        &mut session,
        data,
        &pipeline,
        &config,
        &files,
        Position::default(),
    )
    .expect("one epoch");
    assert_eq!(session.store.get(CLASS_WEIGHTS), Some(&weights[..]));

    let (tensors, _) = checkpoint::load(&files.checkpoint()).expect("checkpoint");
    let (dims, saved) = &tensors[CLASS_WEIGHTS];
    assert_eq!(dims, &vec![11]);
    assert_eq!(saved, &weights);

    // A resumed run keeps the checkpoint's weights, even where they differ
    // from those of the data it is given.
    let mut resumed = Session::new(compile(&spec), 2, KernelSet::Fast, 9).expect("session");
    let mut stored = tensors.clone();
    stored.get_mut(CLASS_WEIGHTS).expect("saved").1 = vec![0.5; 11];
    checkpoint::restore(&files.checkpoint(), &mut resumed.store, stored).expect("restore");
    let more = TrainConfig {
        epochs: 2,
        ..config
    };
    let start = Position { epoch: 1, step: 2 };
    train::train_with(&mut resumed, data, &pipeline, &more, &files, start).expect("epoch 2");
    assert_eq!(resumed.store.get(CLASS_WEIGHTS), Some(&[0.5; 11][..]));
}

#[test]
fn class_weights_rejected_on_mismatch() {
    let mut segmentation = Session::new(compile(&spec()), 2, KernelSet::Fast, 1).expect("session");
    let message = segmentation
        .set_class_weights(&[1.0; 3])
        .expect_err("3 weights for 11 classes")
        .to_string();
    assert!(
        message.contains("3 weights were given for 11 classes"),
        "{message}"
    );

    let classifier = NetSpec::from_ron(
        "(blocks: [1], growth: 2, bottleneck: None, input: (height: 8, width: 8, channels: 1))",
        "classifier",
    )
    .expect("spec");
    let mut classifier =
        Session::new(compile(&classifier), 2, KernelSet::Fast, 1).expect("session");
    let message = classifier
        .set_class_weights(&[1.0; 10])
        .expect_err("a classifier has no class weights")
        .to_string();
    assert!(message.contains("not a segmentation network"), "{message}");
}
