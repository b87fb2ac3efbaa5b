//! `ldnc train` and `ldnc eval` on every dataset kind, through the real binary.
//! Tiny fixtures in the official layouts (CIFAR-10 binary batches, SVHN MAT
//! files, an ILSVRC2012 folder of JPEGs, CamVid's SegNet folders) train a
//! shrunken example network for one epoch, and `ldnc eval` then scores its
//! checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{GrayImage, Luma, Rgb, RgbImage};
use ldnc_runtime::checkpoint;
use ldnc_runtime::data::mat::{self, MatArray, MatData};
use ldnc_runtime::data::{self, DataSpec};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> String {
    repo()
        .join("examples")
        .join(name)
        .to_str()
        .expect("UTF-8 repository path")
        .to_string()
}

fn ldnc(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldnc"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the ldnc binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run_ok(args: &[&str], dir: &Path) -> String {
    let out = ldnc(args, dir);
    assert!(
        out.status.success(),
        "ldnc {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn run_err(args: &[&str], dir: &Path) -> String {
    let out = ldnc(args, dir);
    assert!(
        !out.status.success(),
        "ldnc {} should fail\nstdout:\n{}",
        args.join(" "),
        stdout(&out)
    );
    stderr(&out)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("fixture paths have a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write fixture");
}

/// What one train-then-evaluate run printed and wrote.
struct Run {
    train: String,
    eval: String,
    json: serde_json::Value,
    metrics: serde_json::Value,
}

/// Trains `net` with `overrides` on `data` for one epoch of batch 2 in
/// `work/run`, then evaluates the checkpoint as text and as JSON.
fn train_and_eval(work: &Path, net: &str, overrides: &[&str], data: &str) -> Run {
    let run = work.join("run");
    let run = run.to_str().expect("UTF-8 temp path");
    let mut args = vec![
        "train", net, "--data", data, "--epochs", "1", "--batch", "2", "--out", run,
    ];
    for item in overrides {
        args.extend(["--set", item]);
    }
    let train = run_ok(&args, work);

    let eval = run_ok(&["eval", run, "--data", data, "--batch", "4"], work);
    let json = run_ok(&["eval", run, "--data", data, "--json"], work);
    let json: serde_json::Value = serde_json::from_str(&json).expect("eval --json prints JSON");
    let metrics = std::fs::read_to_string(work.join("run/metrics.jsonl")).expect("metrics.jsonl");
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines.len(), 1, "{metrics}");
    let metrics = serde_json::from_str(lines[0]).expect("a metrics line is JSON");
    Run {
        train,
        eval,
        json,
        metrics,
    }
}

/// A shrunken DenseNet-BC for 32x32 RGB images and 10 classes.
const CIFAR_NET: [&str; 3] = ["blocks=[1,1]", "growth=2", "init_channels=4"];

// ---------------------------------------------------------------- CIFAR-10

/// Encodes a CIFAR-10 binary batch of `count` records with labels `first..`.
fn cifar_batch(count: usize, first: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for record in 0..count {
        out.push(((first + record) % 10) as u8);
        out.extend((0..3072).map(|o| ((o * 7 + record * 31) % 256) as u8));
    }
    out
}

#[test]
fn cifar10_binary_trains_and_evaluates() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("cifar");
    for file in 1..=5 {
        write(
            &dir.join(format!("data_batch_{file}.bin")),
            &cifar_batch(1, file),
        );
    }
    write(&dir.join("test_batch.bin"), &cifar_batch(3, 0));
    let data = format!("cifar10:{}", dir.display());

    let run = train_and_eval(
        work.path(),
        &example("densenet-bc-100.ron"),
        &CIFAR_NET,
        &data,
    );
    assert!(
        run.train
            .contains("training: 4-pixel pad and random crop, flips;"),
        "{}",
        run.train
    );
    assert!(run.train.contains("final test accuracy"), "{}", run.train);
    assert!(run.eval.contains("top-1 accuracy"), "{}", run.eval);
    assert_eq!(run.json["images"], 3);
    assert!(run.json["top5_error"].is_f64(), "{}", run.json);
    assert!(run.metrics["test_top5_error"].is_f64(), "{}", run.metrics);
    assert!(
        run.metrics.get("test_mean_iou").is_none(),
        "{}",
        run.metrics
    );
}

// ---------------------------------------------------------------- SVHN

/// Encodes an SVHN `.mat` file of `count` images with labels 1 to 10 (10 is
/// digit 0).
fn svhn_file(count: usize) -> Vec<u8> {
    let x = (0..3072 * count).map(|i| (i % 253) as u8).collect();
    let labels = (0..count).map(|n| (n % 10 + 1) as f64).collect();
    let arrays = [
        MatArray {
            name: "X".into(),
            class: mat::MX_UINT8,
            dims: vec![32, 32, 3, count],
            data: MatData::U8(x),
        },
        MatArray {
            name: "y".into(),
            class: mat::MX_DOUBLE,
            dims: vec![count, 1],
            data: MatData::Numeric(labels),
        },
    ];
    mat::write::file(&arrays, true)
}

#[test]
fn svhn_mat_trains_with_blur_no_flips() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("svhn");
    write(&dir.join("train_32x32.mat"), &svhn_file(4));
    write(&dir.join("test_32x32.mat"), &svhn_file(2));
    let data = format!("svhn:{}", dir.display());

    let mut overrides = CIFAR_NET.to_vec();
    overrides.push("train.crop_padding=2");
    let run = train_and_eval(
        work.path(),
        &example("densenet-bc-100.ron"),
        &overrides,
        &data,
    );
    assert!(
        run.train.contains(
            "training: 2-pixel pad and random crop, Gaussian blur up to sigma 1 on half the \
             images;"
        ),
        "SVHN digits are blurred and never mirrored: {}",
        run.train
    );
    assert_eq!(run.json["images"], 2);
    assert!(run.eval.contains("top-5 accuracy"), "{}", run.eval);
}

// ---------------------------------------------------------------- ImageNet

fn save_jpeg(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    let image = RgbImage::from_fn(40, 30, |x, y| {
        Rgb([seed.wrapping_mul(40), x as u8 * 6, y as u8 * 8])
    });
    image
        .save_with_format(path, image::ImageFormat::Jpeg)
        .expect("encode JPEG");
}

/// ILSVRC2012 in class folders: two classes, four train and two val JPEGs,
/// plus one undecodable val file.
fn write_imagenet(root: &Path) {
    for (class, seed) in [("n01440764", 1), ("n01443537", 5)] {
        save_jpeg(&root.join(format!("train/{class}/{class}_1.JPEG")), seed);
        save_jpeg(
            &root.join(format!("train/{class}/{class}_2.JPEG")),
            seed + 1,
        );
        save_jpeg(&root.join(format!("val/{class}/{class}_val.JPEG")), seed);
    }
    write(
        &root.join("val/n01443537/broken.JPEG"),
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00not a JPEG",
    );
}

/// A shrunken Log-DenseNet for 16x16 crops and 2 classes.
const IMAGENET_NET: [&str; 6] = [
    "blocks=[1,1]",
    "growth=2",
    "init_channels=4",
    "input.height=16",
    "input.width=16",
    "classes=2",
];

#[test]
fn imagenet_folder_streams_and_reports_top5() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("imagenet");
    write_imagenet(&dir);
    let data = format!("imagenet:{}", dir.display());

    let run = train_and_eval(
        work.path(),
        &example("log-densenet-169-imagenet.ron"),
        &IMAGENET_NET,
        &data,
    );
    assert!(
        run.train.contains("on imagenet (4 train / 3 test images)"),
        "{}",
        run.train
    );
    assert!(
        run.train.contains("random-resized 16x16 crops with flips"),
        "{}",
        run.train
    );
    assert!(run.train.contains("centre 16x16 crop"), "{}", run.train);
    assert!(run.train.contains("top-5 error"), "{}", run.train);
    assert!(run.eval.contains("top-5 accuracy"), "{}", run.eval);
    assert!(
        run.eval.contains("undecodable images skipped: 1"),
        "{}",
        run.eval
    );
    assert_eq!(run.json["images"], 2);
    assert_eq!(run.json["skipped_images"], 1);
    assert_eq!(
        run.json["top5_error"], 0.0,
        "2 classes are always in the top 5"
    );
    assert_eq!(run.metrics["skipped_images"], 1, "{}", run.metrics);
}

#[test]
fn imagenet_missing_val_fails_before_training() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("imagenet");
    write_imagenet(&dir);
    std::fs::remove_dir_all(dir.join("val")).expect("remove val");
    let data = format!("imagenet:{}", dir.display());
    let net = example("log-densenet-169-imagenet.ron");

    let mut args = vec!["train", &net, "--data", &data, "--out", "run"];
    for item in IMAGENET_NET {
        args.extend(["--set", item]);
    }
    let message = run_err(&args, work.path());
    assert!(message.contains("val/"), "{message}");
    assert!(!work.path().join("run").exists(), "nothing is written");
}

/// A JPEG header followed by bytes that no decoder accepts.
const BROKEN_JPEG: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00not a JPEG";

/// Trains the shrunken ImageNet network on `dir` for one epoch of one batch
/// of `batch` images in `work/run` and returns the process output.
fn train_imagenet_once(work: &Path, dir: &Path, batch: &str) -> Output {
    let data = format!("imagenet:{}", dir.display());
    let net = example("log-densenet-169-imagenet.ron");
    let mut args = vec![
        "train", &net, "--data", &data, "--epochs", "1", "--batch", batch, "--out", "run",
    ];
    for item in IMAGENET_NET {
        args.extend(["--set", item]);
    }
    ldnc(&args, work)
}

#[test]
fn imagenet_train_skips_corrupt_jpeg() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("imagenet");
    write_imagenet(&dir);
    write(&dir.join("train/n01443537/corrupt.JPEG"), BROKEN_JPEG);

    // One batch of all 5 train images, so the corrupt one is always in it.
    let out = train_imagenet_once(work.path(), &dir, "5");
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains("corrupt.JPEG"),
        "the skip names the file: {log}"
    );
    assert!(log.contains("skipped=1"), "the epoch logs the count: {log}");
    assert!(
        stdout(&out).contains("undecodable images skipped: 2"),
        "1 train and 1 test image: {}",
        stdout(&out)
    );
    let metrics = std::fs::read_to_string(work.path().join("run/metrics.jsonl")).expect("metrics");
    let row: serde_json::Value = serde_json::from_str(metrics.trim()).expect("one JSON line");
    assert_eq!(row["skipped_images"], 2, "{row}");
    assert_eq!(row["step"], 1, "the other 4 images train in one step");
}

#[test]
fn imagenet_no_decodable_train_image_fails() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("imagenet");
    write_imagenet(&dir);
    for class in ["n01440764", "n01443537"] {
        for number in 1..=2 {
            write(
                &dir.join(format!("train/{class}/{class}_{number}.JPEG")),
                BROKEN_JPEG,
            );
        }
    }

    let out = train_imagenet_once(work.path(), &dir, "2");
    assert!(!out.status.success(), "{}", stdout(&out));
    let message = stderr(&out);
    assert!(
        message.contains("none of the train images of imagenet decoded in epoch 1 (4 failed)"),
        "{message}"
    );
    assert!(
        !work.path().join("run/checkpoint.safetensors").exists(),
        "no checkpoint of an epoch that trained nothing"
    );
}

// ---------------------------------------------------------------- CamVid

const CAMVID_HEIGHT: u32 = 20;
const CAMVID_WIDTH: u32 = 24;

/// Label of pixel (x, y) in image `i`: classes 0 to 10 and void (11).
fn camvid_label(i: u32, x: u32, y: u32) -> u8 {
    ((x / 3 + y / 4 + i) % 12) as u8
}

/// Writes `count` image and label PNGs of one CamVid split.
fn write_camvid_split(root: &Path, split: &str, count: u32) {
    std::fs::create_dir_all(root.join(split)).expect("mkdir");
    std::fs::create_dir_all(root.join(format!("{split}annot"))).expect("mkdir");
    for i in 0..count {
        let image = RgbImage::from_fn(CAMVID_WIDTH, CAMVID_HEIGHT, |x, y| {
            Rgb([camvid_label(i, x, y) * 20, x as u8 * 10, y as u8 * 12])
        });
        let labels = GrayImage::from_fn(CAMVID_WIDTH, CAMVID_HEIGHT, |x, y| {
            Luma([camvid_label(i, x, y)])
        });
        let name = format!("{split}_{i:03}.png");
        image
            .save(root.join(split).join(&name))
            .expect("save image");
        labels
            .save(root.join(format!("{split}annot")).join(&name))
            .expect("save labels");
    }
}

/// A 3-block FC-DenseNet for 16x16 crops, smaller than the 20x24 frames.
const CAMVID_NET: [&str; 5] = [
    "blocks=[1,1,1]",
    "growth=2",
    "init_channels=4",
    "input.height=16",
    "input.width=16",
];

#[test]
fn camvid_trains_on_crops_and_reports_iou() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("camvid");
    write_camvid_split(&dir, "train", 4);
    write_camvid_split(&dir, "val", 1);
    write_camvid_split(&dir, "test", 2);
    let data = format!("camvid:{}", dir.display());

    let run = train_and_eval(
        work.path(),
        &example("fc-densenet-103-camvid.ron"),
        &CAMVID_NET,
        &data,
    );
    assert!(
        run.train.contains("random 16x16 crops with flips"),
        "{}",
        run.train
    );
    assert!(run.train.contains("tiled 16x16 crops"), "{}", run.train);
    assert!(run.train.contains("mean IoU"), "{}", run.train);
    assert!(run.eval.contains("mean IoU"), "{}", run.eval);
    assert!(
        run.eval.contains("Bicyclist"),
        "the IoU table: {}",
        run.eval
    );
    assert!(run.metrics["test_mean_iou"].is_f64(), "{}", run.metrics);
    assert!(run.json["mean_iou"].is_f64(), "{}", run.json);
    assert_eq!(run.json["iou"].as_object().map(|m| m.len()), Some(11));

    // Tiles overlap, yet every non-void pixel of both test frames is scored once.
    let non_void = (0..2)
        .flat_map(|i| {
            (0..CAMVID_HEIGHT).flat_map(move |y| (0..CAMVID_WIDTH).map(move |x| (i, x, y)))
        })
        .filter(|&(i, x, y)| camvid_label(i, x, y) != 11)
        .count();
    assert_eq!(run.json["pixels"], non_void as u64);

    // The loss was weighted by the train split's median-frequency weights,
    // which the checkpoint keeps for resuming and evaluation.
    let spec = DataSpec::parse(&data).expect("spec");
    let weights = data::load(&spec)
        .expect("fixture")
        .class_weights
        .expect("CamVid has class weights");
    let (tensors, _) =
        checkpoint::load(&work.path().join("run/checkpoint.safetensors")).expect("checkpoint");
    assert_eq!(tensors["loss.class_weights"].1, weights);

    // The example trains with RMSprop, whose mean squares the checkpoint
    // keeps, at 1e-3 for the first epoch of its exponential decay.
    assert!(tensors.keys().any(|name| name.ends_with(".mean_square")));
    assert!(!tensors.keys().any(|name| name.ends_with(".velocity")));
    assert_eq!(run.metrics["lr"], 1e-3, "{}", run.metrics);
}

#[test]
fn camvid_rejects_classification_network() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("camvid");
    write_camvid_split(&dir, "train", 2);
    write_camvid_split(&dir, "val", 1);
    write_camvid_split(&dir, "test", 1);
    let data = format!("camvid:{}", dir.display());
    let net = example("densenet-bc-100.ron");

    let mut args = vec![
        "train", &net, "--data", &data, "--batch", "2", "--out", "run",
    ];
    for item in CIFAR_NET.iter().chain(&["classes=11"]) {
        args.extend(["--set", item]);
    }
    let message = run_err(&args, work.path());
    assert!(message.contains("one label per pixel"), "{message}");
}
