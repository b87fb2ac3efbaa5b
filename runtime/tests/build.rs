//! Tests of `ldnc build` and of the executables it writes. Each test runs the
//! real `ldnc` binary, and the executables built from it, in temporary folders.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ldnc_runtime::data::encode_idx;
use tempfile::TempDir;

const LDNC: &str = env!("CARGO_BIN_EXE_ldnc");

/// Bytes of the trailer at the end of a built executable: payload length,
/// CRC32, payload format version and the magic `ldnc-end`.
const TRAILER_LEN: u64 = 24;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the runtime crate sits inside the workspace")
        .to_path_buf()
}

fn quickstart() -> PathBuf {
    repo().join("examples/quickstart.ron")
}

fn bundled_data() -> String {
    format!(
        "fashion-mnist:{}",
        repo().join("data/fashion-mnist").display()
    )
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_remove("LDNC_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `program` and asserts that it succeeds.
fn run_ok(program: &Path, args: &[&str], dir: &Path) -> Output {
    let output = run(program, args, dir);
    assert!(
        output.status.success(),
        "{} {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        program.display(),
        stdout(&output),
        stderr(&output)
    );
    output
}

/// Runs `program`, asserts that it fails, and returns its stderr.
fn run_err(program: &Path, args: &[&str], dir: &Path) -> String {
    let output = run(program, args, dir);
    assert!(
        !output.status.success(),
        "{} {args:?} succeeded but should have failed\nstdout:\n{}",
        program.display(),
        stdout(&output)
    );
    stderr(&output)
}

/// Builds the quick start into `dir/name` with `extra` flags and returns its path.
fn build_quickstart(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let net = quickstart();
    let mut args = vec!["build", net.to_str().expect("UTF-8 path"), "-o", name];
    args.extend_from_slice(extra);
    run_ok(Path::new(LDNC), &args, dir);
    dir.join(name)
}

/// Compares the first `len` bytes of two files in chunks, so that two debug
/// executables of over 100 MiB are never held in memory.
fn same_prefix(a: &Path, b: &Path, len: u64) -> bool {
    let open = |path: &Path| BufReader::new(File::open(path).expect("open")).take(len);
    let (mut a, mut b) = (open(a), open(b));
    let (mut chunk_a, mut chunk_b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut a, &mut chunk_a);
        let m = read_full(&mut b, &mut chunk_b);
        if n != m || chunk_a[..n] != chunk_b[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]).expect("read") {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").len()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = File::open(path).expect("open");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes).expect("read");
    bytes
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let mut file = OpenOptions::new().write(true).open(path).expect("open");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(bytes).expect("write");
}

/// Writes a Fashion-MNIST-shaped IDX dataset of `train` and `test` images,
/// small enough that a whole epoch takes about a second.
fn write_tiny_dataset(dir: &Path, train: usize, test: usize) {
    fs::create_dir_all(dir).expect("create dataset folder");
    let images = |count: usize, salt: usize| -> Vec<u8> {
        (0..count * 28 * 28)
            .map(|i| ((i * 7 + salt) % 256) as u8)
            .collect()
    };
    let labels = |count: usize| -> Vec<u8> { (0..count).map(|i| (i % 10) as u8).collect() };
    let files = [
        (
            "train-images-idx3-ubyte",
            encode_idx(&[train, 28, 28], &images(train, 0)),
        ),
        (
            "train-labels-idx1-ubyte",
            encode_idx(&[train], &labels(train)),
        ),
        (
            "t10k-images-idx3-ubyte",
            encode_idx(&[test, 28, 28], &images(test, 3)),
        ),
        ("t10k-labels-idx1-ubyte", encode_idx(&[test], &labels(test))),
    ];
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).expect("write IDX file");
    }
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(output)))
}

#[test]
fn built_executable_trains_evaluates_and_inspects() {
    let build_dir = TempDir::new().expect("temp dir");
    let built = build_quickstart(build_dir.path(), "quickstart", &[]);

    // The executable must not depend on anything next to it or on the
    // repository being the current folder.
    let work = TempDir::new().expect("temp dir");
    let exe = work.path().join("quickstart");
    fs::copy(&built, &exe).expect("copy the executable");

    let version = stdout(&run_ok(&exe, &["--version"], work.path()));
    assert!(version.starts_with("quickstart "), "{version}");
    let built_by = format!("built by ldnc {}", env!("CARGO_PKG_VERSION"));
    assert!(version.contains(&built_by), "{version}");
    assert!(version.contains("payload format 1"), "{version}");

    let data = bundled_data();
    let bundled = run_ok(
        &exe,
        &[
            "train",
            "--data",
            &data,
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--out",
            "bundled",
        ],
        work.path(),
    );
    let line = stdout(&bundled);
    assert!(
        line.contains("training quickstart on fashion-mnist (10000 train / 2000 test images)"),
        "{line}"
    );

    write_tiny_dataset(&work.path().join("tiny"), 32, 16);
    let tiny = "fashion-mnist:tiny";
    let train_args = [
        "train", "--data", tiny, "--epochs", "1", "--batch", "16", "--out", "run",
    ];
    run_ok(&exe, &train_args, work.path());
    let run_dir = work.path().join("run");
    assert!(run_dir.join("checkpoint.safetensors").is_file());
    let metrics = fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 1, "{metrics}");

    let resume_args = [
        "train", "--data", tiny, "--epochs", "2", "--batch", "16", "--resume", "run",
    ];
    run_ok(&exe, &resume_args, work.path());
    let metrics = fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 2, "{metrics}");

    let eval_args = ["eval", "run", "--data", tiny, "--json"];
    let from_exe = json(&run_ok(&exe, &eval_args, work.path()));
    assert_eq!(from_exe["network"], "quickstart");
    assert_eq!(from_exe["images"], 16);
    let from_ldnc = json(&run_ok(Path::new(LDNC), &eval_args, work.path()));
    assert_eq!(from_exe, from_ldnc);

    // An export from the executable evaluates like the checkpoint.
    run_ok(
        &exe,
        &["export", "run", "--out", "model.safetensors"],
        work.path(),
    );
    let export_args = ["eval", "model.safetensors", "--data", tiny, "--json"];
    let exported = json(&run_ok(Path::new(LDNC), &export_args, work.path()));
    assert_eq!(exported["program"], "export");
    assert_eq!(exported["loss"], from_exe["loss"]);
    assert_eq!(exported["top1_accuracy"], from_exe["top1_accuracy"]);

    let from_exe = stdout(&run_ok(&exe, &["inspect", "--json"], work.path()));
    let net = quickstart();
    let inspect_args = ["inspect", "--json", net.to_str().expect("UTF-8 path")];
    let from_ldnc = stdout(&run_ok(Path::new(LDNC), &inspect_args, work.path()));
    assert_eq!(from_exe, from_ldnc);

    let message = run_err(&exe, &["inspect", "--set", "growth=8"], work.path());
    assert!(message.contains("--set"), "{message}");

    // The executable verifies the checkpoint's checksum like `ldnc eval`.
    let checkpoint = run_dir.join("checkpoint.safetensors");
    let offset = file_len(&checkpoint) - 1000;
    let flipped: Vec<u8> = read_at(&checkpoint, offset, 100)
        .iter()
        .map(|byte| !byte)
        .collect();
    write_at(&checkpoint, offset, &flipped);
    let message = run_err(&exe, &eval_args, work.path());
    assert!(message.contains("is damaged"), "{message}");
}

/// A checkpoint of another network is rejected by the executable's `eval` and
/// `export`, with the fields that differ and both values.
#[test]
fn other_network_checkpoint_names_fields() {
    let work = TempDir::new().expect("temp dir");
    let exe = build_quickstart(work.path(), "quickstart", &[]);
    write_tiny_dataset(&work.path().join("tiny"), 32, 16);
    let net = quickstart();
    let train_args = [
        "train",
        net.to_str().expect("UTF-8 path"),
        "--data",
        "fashion-mnist:tiny",
        "--epochs",
        "1",
        "--batch",
        "16",
        "--set",
        "blocks=[1,1,1]",
        "--out",
        "small",
        "-q",
    ];
    run_ok(Path::new(LDNC), &train_args, work.path());

    let commands: [&[&str]; 2] = [
        &["eval", "small", "--data", "fashion-mnist:tiny"],
        &["export", "small", "--out", "small.safetensors"],
    ];
    for args in commands {
        let message = run_err(&exe, args, work.path());
        assert!(message.contains("different network"), "{message}");
        assert!(
            message.contains("blocks: [1, 1, 1] in the checkpoint, ["),
            "{message}"
        );
    }
}

#[test]
fn help_names_export_command() {
    let work = TempDir::new().expect("temp dir");
    let build_help = stdout(&run_ok(Path::new(LDNC), &["build", "--help"], work.path()));
    assert!(
        build_help.contains("trains, evaluates, exports and inspects"),
        "{build_help}"
    );

    let exe = build_quickstart(work.path(), "quickstart", &[]);
    let help = stdout(&run_ok(&exe, &["--help"], work.path()));
    assert!(
        help.contains("Train, evaluate, export and inspect the network"),
        "{help}"
    );
    assert!(help.contains("  export "), "{help}");
}

#[test]
fn builds_are_byte_identical() {
    let first = TempDir::new().expect("temp dir");
    let second = TempDir::new().expect("temp dir");
    let emit = ["--emit", "graph,program"];
    let a = build_quickstart(first.path(), "a", &emit);
    let b = build_quickstart(second.path(), "b", &emit);

    let len = file_len(&a);
    assert_eq!(len, file_len(&b));
    assert!(
        same_prefix(&a, &b, len),
        "{} and {} differ",
        a.display(),
        b.display()
    );
    let image_len = file_len(Path::new(LDNC));
    assert!(len > image_len + TRAILER_LEN);
    assert!(
        same_prefix(&a, Path::new(LDNC), image_len),
        "the executable does not start with a copy of ldnc"
    );
    for suffix in ["forward.dot", "train.dot", "program.txt"] {
        let text_a = fs::read(first.path().join(format!("a.{suffix}"))).expect(suffix);
        let text_b = fs::read(second.path().join(format!("b.{suffix}"))).expect(suffix);
        assert!(text_a == text_b, "{suffix} differs between builds");
    }
}

/// Several loss heads must not make the build order depend on hashing.
#[test]
fn deep_supervision_builds_are_byte_identical() {
    let dir = TempDir::new().expect("temp dir");
    let net = repo().join("examples/log-densenet-v1-cifar.ron");
    let net = net.to_str().expect("UTF-8 path");
    for name in ["a", "b"] {
        run_ok(
            Path::new(LDNC),
            &["build", net, "-o", name, "-q"],
            dir.path(),
        );
    }
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert!(same_prefix(&a, &b, file_len(&a).max(file_len(&b))));
}

#[test]
fn damaged_payload_is_rejected() {
    let dir = TempDir::new().expect("temp dir");
    let exe = build_quickstart(dir.path(), "quickstart", &[]);
    let len = file_len(&exe);
    let path = exe.display().to_string();

    // One flipped byte inside the compressed body.
    let offset = len - TRAILER_LEN - 10;
    let original = read_at(&exe, offset, 1);
    write_at(&exe, offset, &[original[0] ^ 0x5a]);
    let message = run_err(&exe, &["--version"], dir.path());
    assert!(message.contains(&path), "{message}");
    assert!(message.contains("fails its checksum"), "{message}");
    write_at(&exe, offset, &original);
    run_ok(&exe, &["--version"], dir.path());

    // A trailer that records more payload than the file holds.
    let length_field = len - TRAILER_LEN;
    let original = read_at(&exe, length_field, 8);
    write_at(&exe, length_field, &u64::MAX.to_le_bytes());
    let message = run_err(&exe, &["inspect"], dir.path());
    assert!(message.contains(&path), "{message}");
    assert!(message.contains("records a payload of"), "{message}");
    write_at(&exe, length_field, &original);

    // A trailer that points into the executable image, off the payload magic.
    write_at(&exe, length_field, &(len / 2).to_le_bytes());
    let message = run_err(&exe, &["inspect"], dir.path());
    assert!(message.contains(&path), "{message}");
    assert!(message.contains("magic bytes"), "{message}");
    write_at(&exe, length_field, &original);

    // A partial trailer, then no trailer and part of the payload gone.
    for cut in [5, TRAILER_LEN + 100] {
        let file = OpenOptions::new().write(true).open(&exe).expect("open");
        file.set_len(file_len(&exe) - cut).expect("truncate");
        drop(file);
        let message = run_err(&exe, &["--version"], dir.path());
        assert!(message.contains(&path), "cut {cut}: {message}");
        assert!(
            message.contains("trailer is missing or damaged"),
            "cut {cut}: {message}"
        );
    }

    let plain = stdout(&run_ok(Path::new(LDNC), &["--version"], dir.path()));
    assert!(plain.starts_with("ldnc "), "{plain}");
}

#[test]
fn other_payload_version_names_both() {
    let dir = TempDir::new().expect("temp dir");
    let exe = dir.path().join("future");
    fs::copy(LDNC, &exe).expect("copy ldnc");

    let section = b"ldnc-net and a body that only a later ldnc could read".to_vec();
    let mut trailer = Vec::new();
    trailer.extend_from_slice(&(section.len() as u64).to_le_bytes());
    trailer.extend_from_slice(&crc32fast::hash(&section).to_le_bytes());
    trailer.extend_from_slice(&99u32.to_le_bytes());
    trailer.extend_from_slice(b"ldnc-end");
    let mut file = OpenOptions::new().append(true).open(&exe).expect("open");
    file.write_all(&section).expect("append payload");
    file.write_all(&trailer).expect("append trailer");
    drop(file);

    let message = run_err(&exe, &["--version"], dir.path());
    assert!(message.contains(&exe.display().to_string()), "{message}");
    assert!(message.contains("format version 99"), "{message}");
    assert!(message.contains("payload format version 1"), "{message}");
}

#[test]
fn unwritable_output_is_reported() {
    let dir = TempDir::new().expect("temp dir");
    fs::write(dir.path().join("plain-file"), "not a folder").expect("write");
    let net = quickstart();
    let net = net.to_str().expect("UTF-8 path");

    let message = run_err(
        Path::new(LDNC),
        &["build", net, "-o", "plain-file/exe"],
        dir.path(),
    );
    assert!(message.contains("cannot write plain-file/exe"), "{message}");
    assert!(
        message.contains("choose another output with -o"),
        "{message}"
    );

    let ldnc_len = file_len(Path::new(LDNC));
    let message = run_err(Path::new(LDNC), &["build", net, "-o", LDNC], dir.path());
    assert!(message.contains("is the running ldnc"), "{message}");
    assert_eq!(file_len(Path::new(LDNC)), ldnc_len);

    // A folder as -o gets the network's name inside it, and nothing else is
    // left there (no temporary files).
    fs::create_dir(dir.path().join("out")).expect("mkdir");
    run_ok(
        Path::new(LDNC),
        &["build", net, "-o", "out", "-q"],
        dir.path(),
    );
    let names: Vec<String> = fs::read_dir(dir.path().join("out"))
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        vec![format!("quickstart{}", std::env::consts::EXE_SUFFIX)]
    );
}

#[test]
fn emit_and_explain_describe_the_pipeline() {
    let dir = TempDir::new().expect("temp dir");
    let net = quickstart();
    let args = [
        "build",
        net.to_str().expect("UTF-8 path"),
        "--emit",
        "graph,program",
        "--explain",
        "--target",
        "cuda",
    ];
    let output = run_ok(Path::new(LDNC), &args, dir.path());
    let explained = stdout(&output);
    for phrase in [
        "expand",
        "fuse",
        "autodiff",
        "training program",
        "naive",
        "planned",
        "rule matches: ",
        "training program: fused steps: ",
        "bn_relu_conv x",
    ] {
        assert!(
            explained.contains(phrase),
            "missing {phrase:?} in:\n{explained}"
        );
    }
    // Every op of the fused programs lowers to CUDA, so a CUDA build carries
    // kernels and prints no fallback note.
    let notes = stderr(&output);
    assert!(!notes.contains("CPU programs only"), "{notes}");

    let exe = dir
        .path()
        .join(format!("quickstart{}", std::env::consts::EXE_SUFFIX));
    let version = stdout(&run_ok(&exe, &["--version"], dir.path()));
    assert!(version.contains("CUDA kernels"), "{version}");
    assert!(!version.contains("no CUDA kernels"), "{version}");

    let forward = fs::read_to_string(dir.path().join("quickstart.forward.dot")).expect("dot");
    let training = fs::read_to_string(dir.path().join("quickstart.train.dot")).expect("dot");
    for graph in [&forward, &training] {
        assert!(graph.starts_with("digraph "), "{}", &graph[..80]);
        assert!(graph.trim_end().ends_with('}'));
        assert!(graph.contains(" -> "));
    }
    let count_nodes = |graph: &str| graph.lines().filter(|l| l.contains(" [label=\"")).count();
    assert!(count_nodes(&training) > count_nodes(&forward));

    let program = fs::read_to_string(dir.path().join("quickstart.program.txt")).expect("text");
    let steps: Vec<&str> = program.lines().filter(|l| !l.starts_with('#')).collect();
    let header = format!("# {} steps,", steps.len());
    assert!(
        program.contains(&header),
        "header does not count {} steps",
        steps.len()
    );
    assert!(steps
        .iter()
        .all(|l| l.contains(" -> %") && l.contains(" in ")));
    assert!(
        steps.iter().any(|l| l.contains("BnReluConv")),
        "no fused step"
    );
}

#[test]
fn cuda_target_embeds_kernel_sources() {
    let dir = TempDir::new().expect("temp dir");
    let exe = build_quickstart(
        dir.path(),
        "qs-cuda",
        &["--no-fuse", "--target", "all", "--emit", "cuda"],
    );
    let version = stdout(&run_ok(&exe, &["--version"], dir.path()));
    assert!(version.contains("CUDA kernels"), "{version}");
    assert!(!version.contains("no CUDA kernels"), "{version}");
    for program in ["train", "eval"] {
        let source = fs::read_to_string(dir.path().join(format!("qs-cuda.{program}.cu")))
            .expect("the CUDA source is written next to the executable");
        assert!(source.contains("__global__"), "{program}.cu has no kernels");
    }

    // Without `--device`, an executable with CUDA kernels uses a GPU when it finds
    // one and otherwise says once that it trains on the CPU.
    let run_dir = dir.path().join("run");
    let data = bundled_data();
    let trained = run_ok(
        &exe,
        &[
            "train",
            "--data",
            &data,
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "-q",
            "--out",
            run_dir.to_str().unwrap(),
        ],
        dir.path(),
    );
    let notes = stderr(&trained);
    assert!(notes.matches("training on the CPU").count() <= 1, "{notes}");

    // A CPU-only build records that it has no CUDA kernels.
    let plain = build_quickstart(dir.path(), "qs-cpu", &[]);
    let version = stdout(&run_ok(&plain, &["--version"], dir.path()));
    assert!(version.contains("no CUDA kernels"), "{version}");
}
