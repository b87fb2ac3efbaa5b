//! The `ldnc` binary run as a user runs it: every example inspects, training and
//! evaluation work on the bundled data, and bad input gets a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ldnc_runtime::data::encode_idx;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ldnc(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldnc"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the ldnc binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bundled() -> String {
    format!(
        "fashion-mnist:{}",
        repo().join("data/fashion-mnist").display()
    )
}

/// A quick-start network small enough for a few steps in the test profile.
const SMALL: [&str; 2] = ["--set", "blocks=[1,1,1]"];

#[test]
fn every_example_inspects() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 18, "{examples:?}");
    for path in examples {
        let out = ldnc(&["inspect", path.to_str().unwrap(), "--json"], &repo());
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        for key in [
            "feature_layers",
            "connections",
            "mbd",
            "params",
            "macs_per_image",
        ] {
            assert!(report.get(key).is_some(), "{}: no {key}", path.display());
        }
        assert!(report["memory"]["naive_bytes"].as_u64().unwrap() > 0);
        assert!(report["memory"]["planned_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn inspect_plots_the_connection_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("m.png");
    let net = repo().join("examples/log-densenet-v1-cifar.ron");
    let out = ldnc(
        &[
            "inspect",
            net.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("MBD"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn inspect_passes_names_rule_matches() {
    let net = repo().join("examples/quickstart.ron");
    let out = ldnc(&["inspect", net.to_str().unwrap(), "--passes"], &repo());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let fusion: Vec<&str> = text.lines().filter(|l| l.starts_with("fusion (")).collect();
    assert_eq!(fusion.len(), 2, "{text}");
    for line in fusion {
        assert!(
            line.contains("rule matches, not fused steps kept"),
            "{line}"
        );
        assert!(line.contains("`ldnc build --explain`"), "{line}");
    }
    let remat = text
        .lines()
        .find(|l| l.starts_with("rematerialisation (training): "))
        .unwrap_or_else(|| panic!("no rematerialisation line: {text}"));
    assert!(remat.contains("pooled transition input"), "{remat}");
    assert!(
        !text.contains("recomputed in the backward pass (training)"),
        "{text}"
    );
}

#[test]
fn closed_stdout_exits_quietly() {
    let net = repo().join("examples/quickstart.ron");
    for format in ["--passes", "--json"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ldnc"))
            .args(["inspect", net.to_str().unwrap(), format])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the ldnc binary starts");
        // Closing the read end before ldnc has compiled the network makes its
        // first write fail with a broken pipe, as after `| head -1`.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{format}: {:?}", out.status);
        assert_eq!(stderr(&out), "", "{format}");
    }
}

#[test]
fn malformed_network_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("bad.ron");
    std::fs::write(
        &net,
        "(\n  blocks: [4, 4],\n  growth: 12\n  classes: 10,\n)",
    )
    .unwrap();
    let out = ldnc(&["inspect", net.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.ron:4:"), "{err}");
    assert!(err.contains("hint"), "{err}");
}

#[test]
fn unreadable_network_files_named_once() {
    let dir = tempfile::tempdir().unwrap();
    // A safetensors file starts with the little-endian length of its header.
    let mut checkpoint = 2u64.to_le_bytes().to_vec();
    checkpoint.extend(b"{}\xff\xfe");
    std::fs::write(dir.path().join("run.safetensors"), checkpoint).unwrap();
    std::fs::create_dir(dir.path().join("runs")).unwrap();
    let cases = [
        ("run.safetensors", "run.safetensors is not a RON text file"),
        ("runs", "runs is a folder; pass a network file (.ron)"),
        ("nope.ron", "cannot read nope.ron: "),
    ];
    for (given, expected) in cases {
        let out = ldnc(&["inspect", given], dir.path());
        assert!(!out.status.success(), "{given} inspected");
        let err = stderr(&out);
        assert!(err.contains(expected), "{given}: {err}");
        assert_eq!(err.matches(given).count(), 1, "{given}: {err}");
        assert!(!err.contains("UTF-8"), "{given}: {err}");
        assert!(!err.contains("os error 21"), "{given}: {err}");
    }
}

#[test]
fn unknown_set_path_lists_fields() {
    let net = repo().join("examples/quickstart.ron");
    let out = ldnc(
        &["inspect", net.to_str().unwrap(), "--set", "grwoth=3"],
        &repo(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("grwoth"), "{err}");
    assert!(err.contains("growth"), "{err}");
}

#[test]
fn invalid_network_names_the_field() {
    let net = repo().join("examples/quickstart.ron");
    let out = ldnc(
        &["inspect", net.to_str().unwrap(), "--set", "growth=0"],
        &repo(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`growth`"), "{}", stderr(&out));
}

#[test]
fn bad_data_specs_are_explained() {
    let net = repo().join("examples/quickstart.ron");
    let net = net.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let out = ldnc(&["train", net, "--data", "mnist-ish:/x"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cifar10"), "{}", stderr(&out));

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let spec = format!("fashion-mnist:{}", empty.display());
    let out = ldnc(&["train", net, "--data", &spec], dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train-images-idx3-ubyte"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn train_eval_and_refuse_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let net = net.to_str().unwrap();
    let run = dir.path().join("run");
    let run_arg = run.to_str().unwrap();
    let data = bundled();
    let mut args = vec![
        "train", net, "--data", &data, "--epochs", "1", "--out", run_arg,
    ];
    args.extend(SMALL);
    args.extend(["--batch", "100", "-q"]);
    let out = ldnc(&args, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("final test accuracy"),
        "{}",
        stdout(&out)
    );
    for file in ["checkpoint.safetensors", "metrics.jsonl", "curves.png"] {
        assert!(run.join(file).exists(), "{file} missing");
    }

    let out = ldnc(&["eval", run_arg, "--data", &data, "--json"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(result["images"], 2000);
    let accuracy = result["top1_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "one epoch should beat chance: {accuracy}");

    // A second run into the same folder must not touch the checkpoint.
    let before = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let out = ldnc(&args, dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    assert_eq!(
        before,
        std::fs::read(run.join("checkpoint.safetensors")).unwrap()
    );
}

/// A network whose batch norms fold into convs (bottleneck layers and a stem
/// with BN-ReLU) evaluates to the same accuracy and loss with the fused
/// program, where they are folded, and with the unfused one.
#[test]
fn folded_eval_matches_unfused() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let run = dir.path().join("run");
    let run_arg = run.to_str().unwrap();
    let data = bundled();
    let mut args = vec![
        "train",
        net.to_str().unwrap(),
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch",
        "100",
        "--out",
        run_arg,
        "-q",
        "--set",
        "bottleneck=Some(2)",
        "--set",
        "stem=Plain",
    ];
    args.extend(SMALL);
    let out = ldnc(&args, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let mut results = Vec::new();
    for extra in [&[][..], &["--no-fuse"][..]] {
        let eval = [&["eval", run_arg, "--data", &data, "--json"][..], extra].concat();
        let out = ldnc(&eval, dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        let result: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        results.push(result);
    }
    assert_eq!(results[0]["fused"], true);
    assert_eq!(results[1]["fused"], false);
    assert_eq!(results[0]["images"], 2000);
    assert_eq!(results[0]["top1_accuracy"], results[1]["top1_accuracy"]);
    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    let (folded, unfused) = (loss(&results[0]), loss(&results[1]));
    assert!(
        (folded - unfused).abs() <= 1e-4 * (1.0 + unfused.abs()),
        "loss {folded} folded, {unfused} unfused"
    );
}

/// `ldnc export` folds the bottleneck batch norms of a trained run into its
/// convs, and `ldnc eval` of the export reproduces the checkpoint's figures.
#[test]
fn export_evaluates_like_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &["--set", "bottleneck=Some(2)"]);

    let export = ["export", "run", "--out", "model.safetensors", "--json"];
    let out = ldnc(&export, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let precomputed = summary["precomputed"].as_array().unwrap();
    assert!(!precomputed.is_empty(), "nothing was folded: {summary}");
    assert!(precomputed
        .iter()
        .all(|name| name.as_str().unwrap().contains(".folded")));

    let evaluate = |source: &str| {
        let out = ldnc(&["eval", source, "--data", &data, "--json"], dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()
    };
    let (exported, trained) = (evaluate("model.safetensors"), evaluate("run"));
    assert_eq!(exported["program"], "export");
    assert_eq!(trained["program"], "fused");
    assert_eq!(exported["loss"], trained["loss"]);
    assert_eq!(exported["top1_accuracy"], trained["top1_accuracy"]);

    let out = ldnc(
        &["eval", "model.safetensors", "--data", &data, "--no-fuse"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is an export"), "{}", stderr(&out));
    let out = ldnc(
        &["export", "model.safetensors", "--out", "again.safetensors"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already an export"),
        "{}",
        stderr(&out)
    );

    // An unfused export reports `fused: false` and accepts --no-fuse.
    let unfused = ["export", "run", "--out", "unfused.safetensors", "--no-fuse"];
    let out = ldnc(&unfused, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let args = [
        "eval",
        "unfused.safetensors",
        "--data",
        &data,
        "--json",
        "--no-fuse",
    ];
    let out = ldnc(&args, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(result["fused"], false);
    assert_eq!(result["export"], "unfused.safetensors");
    assert_eq!(result["top1_accuracy"], trained["top1_accuracy"]);

    // A damaged export names the remedy for exports.
    let mut bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(dir.path().join("damaged.safetensors"), bytes).unwrap();
    let out = ldnc(
        &["eval", "damaged.safetensors", "--data", &data],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is damaged"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("export the checkpoint again"),
        "{}",
        stderr(&out)
    );

    let out = ldnc(
        &["export", "run", "--out", "nodir/model.safetensors"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the folder nodir does not exist"),
        "{}",
        stderr(&out)
    );
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let out = ldnc(&["export", "empty", "--out", "x.safetensors"], dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no checkpoint.safetensors"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn diverging_loss_stops_with_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let data = bundled();
    let mut args = vec![
        "train",
        net.to_str().unwrap(),
        "--data",
        &data,
        "--lr",
        "1e12",
        "--schedule",
        "constant",
        "--epochs",
        "1",
        "-q",
    ];
    args.extend(SMALL);
    let out = ldnc(&args, dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("at step"), "{err}");
}

#[test]
fn unreadable_checkpoint_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let out = ldnc(
        &["eval", path.to_str().unwrap(), "--data", &bundled()],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("checkpoint.safetensors"),
        "{}",
        stderr(&out)
    );
}

/// Writes a Fashion-MNIST-shaped dataset of 32 train and 16 test images into
/// `dir`, so that an epoch of the small quick-start network takes well under
/// a second.
fn write_tiny_dataset(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let images = |count: usize| -> Vec<u8> {
        (0..count * 28 * 28)
            .map(|i| ((i * 7) % 256) as u8)
            .collect()
    };
    let labels = |count: usize| -> Vec<u8> { (0..count).map(|i| (i % 10) as u8).collect() };
    let files = [
        (
            "train-images-idx3-ubyte",
            encode_idx(&[32, 28, 28], &images(32)),
        ),
        ("train-labels-idx1-ubyte", encode_idx(&[32], &labels(32))),
        (
            "t10k-images-idx3-ubyte",
            encode_idx(&[16, 28, 28], &images(16)),
        ),
        ("t10k-labels-idx1-ubyte", encode_idx(&[16], &labels(16))),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    format!("fashion-mnist:{}", dir.display())
}

/// Trains the small quick-start network, with `extra` arguments such as
/// `--set` overrides, for one epoch on the tiny dataset into `dir/run`, and
/// returns the data spec.
fn train_tiny_run(dir: &Path, extra: &[&str]) -> String {
    let data = write_tiny_dataset(&dir.join("tiny"));
    let net = repo().join("examples/quickstart.ron");
    let mut args = vec![
        "train",
        net.to_str().unwrap(),
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch",
        "16",
        "--out",
        "run",
        "-q",
    ];
    args.extend(SMALL);
    args.extend(extra);
    let out = ldnc(&args, dir);
    assert!(out.status.success(), "{}", stderr(&out));
    data
}

/// Runs `ldnc train` on the small quick-start network in `dir` with
/// `--resume run` and the extra `flags`, as after [`train_tiny_run`].
fn resume_tiny_run(dir: &Path, data: &str, flags: &[&str]) -> Output {
    let net = repo().join("examples/quickstart.ron");
    let mut args = vec![
        "train",
        net.to_str().unwrap(),
        "--data",
        data,
        "--resume",
        "run",
    ];
    args.extend(SMALL);
    args.extend(flags);
    ldnc(&args, dir)
}

#[test]
fn damaged_checkpoint_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &[]);
    let path = dir.path().join("run/checkpoint.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor data fills the end of the file, after the JSON header.
    let middle = bytes.len() - 2000;
    for byte in &mut bytes[middle..middle + 100] {
        *byte = !*byte;
    }
    std::fs::write(&path, &bytes).unwrap();

    let out = ldnc(&["eval", "run", "--data", &data], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("checkpoint.safetensors is damaged"), "{err}");
    assert!(err.contains("retrain"), "{err}");

    let flags = ["--epochs", "2", "--batch", "16", "-q"];
    let out = resume_tiny_run(dir.path(), &data, &flags);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("checkpoint.safetensors is damaged"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "resuming trained on: {metrics}");
}

#[test]
fn out_file_rejected_before_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("taken"), "not a run").unwrap();
    let net = repo().join("examples/quickstart.ron");
    // The dataset folder does not exist, so only a check made before loading
    // it can name --out.
    let args = [
        "train",
        net.to_str().unwrap(),
        "--data",
        "cifar10:nodir",
        "--out",
        "taken",
    ];
    let out = ldnc(&args, dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--out taken is a file; pass a folder for the run"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    let untouched = std::fs::read_to_string(dir.path().join("taken")).unwrap();
    assert_eq!(untouched, "not a run");
}

#[test]
fn zero_counts_rejected_before_output() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let net = net.to_str().unwrap();
    let data = bundled();
    let train = ["train", net, "--data", &data, "--out", "run"];
    let cases = [
        (vec!["--batch", "0"], "'--batch"),
        (vec!["--epochs", "0"], "'--epochs"),
        (vec!["--set", "train.batch=0"], "`train.batch`"),
        (vec!["--set", "train.epochs=0"], "`train.epochs`"),
    ]
    .map(|(flags, named)| ([&train[..], &flags[..]].concat(), named));
    let others = [
        (
            vec!["eval", "run", "--data", &data, "--batch", "0"],
            "'--batch",
        ),
        (vec!["bench", net, "--steps", "0"], "'--steps"),
        (vec!["bench", net, "--batch", "0"], "'--batch"),
    ];
    for (args, named) in cases.into_iter().chain(others) {
        let out = ldnc(&args, dir.path());
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(err.contains("at least 1"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!dir.path().join("run").exists(), "{args:?} created run");
    }
}

#[test]
fn resuming_finished_run_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &[]);

    let out = resume_tiny_run(dir.path(), &data, &["--epochs", "1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("has already completed 1 epoch ("), "{err}");
    assert!(err.contains("--epochs M with M larger than 1"), "{err}");

    let out = resume_tiny_run(dir.path(), &data, &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("completed 1 epoch"),
        "{}",
        stderr(&out)
    );
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
}

#[test]
fn resume_rejects_changed_settings() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &[]);
    let resume = |flags: &[&str]| {
        let flags = [&["--epochs", "2", "-q"][..], flags].concat();
        resume_tiny_run(dir.path(), &data, &flags)
    };

    let out = resume(&["--batch", "8"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--batch differs"), "{}", stderr(&out));
    let out = resume(&["--schedule", "constant"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--schedule or --lr-decay differs"));

    // Repeating the saved batch size is allowed.
    let out = resume(&["--batch", "16"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `--resume` takes a run folder or its checkpoint.safetensors, and names
/// exports and other files as what they are.
#[test]
fn resume_explains_files_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &[]);
    let export = ["export", "run", "--out", "model.safetensors"];
    let out = ldnc(&export, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir(dir.path().join("exported")).unwrap();
    std::fs::copy(
        dir.path().join("model.safetensors"),
        dir.path().join("exported/checkpoint.safetensors"),
    )
    .unwrap();

    let net = repo().join("examples/quickstart.ron");
    let resume = |given: &str| {
        let mut args = vec![
            "train",
            net.to_str().unwrap(),
            "--data",
            &data,
            "--resume",
            given,
            "--epochs",
            "2",
            "-q",
        ];
        args.extend(SMALL);
        ldnc(&args, dir.path())
    };
    let cases = [
        (
            "model.safetensors",
            "--resume model.safetensors is an export",
        ),
        (
            "exported",
            "--resume exported: its checkpoint.safetensors is an export",
        ),
        ("run/metrics.jsonl", "is a file, not a run folder"),
    ];
    for (given, expected) in cases {
        let out = resume(given);
        assert!(!out.status.success(), "{given} resumed");
        let err = stderr(&out);
        assert!(err.contains(expected), "{given}: {err}");
        assert!(!err.contains("checkpoint format"), "{given}: {err}");
    }

    let out = resume("run/checkpoint.safetensors");
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

#[test]
fn resume_names_network_differences() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_tiny_run(dir.path(), &[]);
    let flags = ["--epochs", "2", "-q", "--set", "blocks=[2,1,1]"];
    let out = resume_tiny_run(dir.path(), &data, &flags);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("different network"), "{err}");
    assert!(
        err.contains("blocks: [1, 1, 1] in the checkpoint, [2, 1, 1] here"),
        "{err}"
    );
    assert!(!err.contains("growth:"), "{err}");
}

#[test]
fn resume_takes_quiet_from_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // The first run is quiet, so its stored configuration hides progress.
    let data = train_tiny_run(dir.path(), &[]);

    let out = resume_tiny_run(dir.path(), &data, &["--epochs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("epoch   2/2"), "{}", stdout(&out));

    let out = resume_tiny_run(dir.path(), &data, &["--epochs", "3", "-q"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("epoch   3/3"), "{}", stdout(&out));
    assert!(
        !stdout(&out).contains("training quickstart"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn missing_paths_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let net = net.to_str().unwrap();
    let data = bundled();
    std::fs::write(dir.path().join("metrics.jsonl"), "{\"epoch\":1}\n").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["inspect", "nope.ron"], "cannot read nope.ron: "),
        (
            &["train", net, "--data", &data, "--resume", "nodir"],
            "--resume nodir: the folder does not exist",
        ),
        (&["eval", "nodir", "--data", &data], "nodir does not exist"),
        (
            &["eval", "metrics.jsonl", "--data", &data],
            "metrics.jsonl is not a checkpoint or is truncated",
        ),
        (
            &["inspect", net, "--plot", "nodir/m.png"],
            "cannot create nodir/m.png: ",
        ),
        (
            &["train", net, "--data", "cifar10:nodir"],
            "the folder nodir does not exist",
        ),
    ];
    for (args, expected) in cases {
        let out = ldnc(args, dir.path());
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(err.matches("(os error").count() <= 1, "{args:?}: {err}");
        for raw in ["HeaderTooLarge", "ImageError", "Os {", "files missing"] {
            assert!(!err.contains(raw), "{args:?}: {err}");
        }
    }
}

#[test]
fn cuda_device_fails_clearly_without_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let net = repo().join("examples/quickstart.ron");
    let data = bundled();
    let base = [
        "train",
        net.to_str().unwrap(),
        "--data",
        &data,
        "-q",
        "--epochs",
        "1",
        "--max-steps",
        "2",
    ];

    let out = ldnc(&[&base[..], &["--device", "tpu"]].concat(), dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("use cpu, cuda, cuda:0 or auto"),
        "{}",
        stderr(&out)
    );

    let out = ldnc(
        &[&base[..], &["--device", "cuda", "--no-fuse"]].concat(),
        dir.path(),
    );
    if out.status.success() {
        eprintln!("SKIPPED cuda_device_fails_clearly_without_a_gpu: a GPU trained the network");
        return;
    }
    let err = stderr(&out);
    assert!(
        err.contains("--device cpu") || err.contains("CUDA"),
        "{err}"
    );
}

// ------------------------------------------------------- ldnc data bench

/// Writes `count` gradient JPEGs of varying sizes into `dir`.
fn write_jpegs(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for index in 0..count {
        let (width, height) = (40 + 7 * index as u16, 30 + 5 * index as u16);
        let pixels: Vec<u8> = (0..width as usize * height as usize)
            .flat_map(|i| [(i % 251) as u8, (i / 3 % 253) as u8, (index * 40) as u8])
            .collect();
        let mut bytes = Vec::new();
        jpeg_encoder::Encoder::new(&mut bytes, 90)
            .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        std::fs::write(dir.join(format!("image_{index}.JPEG")), bytes).unwrap();
    }
}

/// Writes an ILSVRC2012 tree of 10 train and 7 val files in two classes, one
/// of the val files undecodable, and returns its data spec.
fn write_bench_imagenet(root: &Path) -> String {
    for class in ["n01", "n02"] {
        write_jpegs(&root.join("train").join(class), 5);
        write_jpegs(&root.join("val").join(class), 3);
    }
    std::fs::write(root.join("val/n02/broken.JPEG"), b"not a JPEG").unwrap();
    format!("imagenet:{}", root.display())
}

fn bench_json(args: &[&str], dir: &Path) -> serde_json::Value {
    let out = ldnc(args, dir);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn data_bench_counts_train_batches() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_bench_imagenet(dir.path());
    // Five batches of 4 take two epochs of two whole batches and one more.
    let args = [
        "data",
        "bench",
        &spec,
        "--threads",
        "2",
        "--batches",
        "5",
        "--batch-size",
        "4",
        "--input-size",
        "32",
        "--json",
    ];
    let result = bench_json(&args, dir.path());

    assert_eq!(result["split"], "train");
    assert_eq!(result["threads"], 2);
    assert_eq!(result["batch_size"], 4);
    assert_eq!(result["batches"], 5);
    assert_eq!(result["images"], 20);
    assert_eq!(result["skipped"], 0);
    assert_eq!(result["image_shape"], serde_json::json!([32, 32, 3]));
    assert_eq!(result["pipeline"], "random-resized 32x32 crops with flips");
    let seconds = result["seconds"].as_f64().unwrap();
    let rate = result["images_per_second"].as_f64().unwrap();
    let per_thread = result["images_per_second_per_thread"].as_f64().unwrap();
    assert!(seconds > 0.0, "{result}");
    assert!((rate * seconds - 20.0).abs() < 1e-6, "{result}");
    assert!((per_thread * 2.0 - rate).abs() < 1e-6, "{result}");
}

#[test]
fn data_bench_eval_skips_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_bench_imagenet(dir.path());
    // One pass over 7 val files in batches of 4: two batches, 6 images decode.
    let args = [
        "data",
        "bench",
        &spec,
        "--eval",
        "--threads",
        "1",
        "--batch-size",
        "4",
        "--json",
    ];
    let result = bench_json(&args, dir.path());

    assert_eq!(result["split"], "test");
    assert_eq!(result["batches"], 2);
    assert_eq!(result["images"], 6);
    assert_eq!(result["skipped"], 1);
    assert_eq!(result["image_shape"], serde_json::json!([224, 224, 3]));
    assert_eq!(
        result["pipeline"],
        "shorter side resized to 256, centre 224x224 crop"
    );
}

#[test]
fn data_bench_prints_text() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_bench_imagenet(dir.path());
    let out = ldnc(
        &[
            "data",
            "bench",
            &spec,
            "--batch-size",
            "5",
            "--input-size",
            "16",
            "-q",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("imagenet train split"), "{text}");
    assert!(text.contains("10 images in 2 batches"), "{text}");
    assert!(text.contains("images/s per thread"), "{text}");
}

#[test]
fn data_bench_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_bench_imagenet(dir.path());

    let out = ldnc(&["data", "bench", &spec, "--batch-size", "11"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has 10 images"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--batch-size"), "{}", stderr(&out));

    let out = ldnc(&["data", "bench", &spec, "--threads", "0"], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--threads"), "{}", stderr(&out));

    let out = ldnc(&["data", "bench", &bundled()], dir.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("imagenet:DIR"), "{}", stderr(&out));
}
