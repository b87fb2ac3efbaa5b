//! `ldnc data bench`: throughput of the input pipeline that training and
//! evaluation read image files through (decode, augment, normalize, batch on
//! the prefetching loader), with no network attached.
//!
//! The batches come from [`FileBatches`] with the augmentation that
//! [`Pipeline::for_dataset`] picks for the dataset, so this times the
//! trainer's own code. Throughput is images delivered per second of wall time,
//! from starting the loader to receiving the last batch. CPU time is the
//! process's user plus system time from the start until the loader's threads
//! have exited. It includes any batch decoded ahead but never consumed.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ldnc_ir::spec::InputSpec;
use ldnc_runtime::data::{self, BatchConfig, DataSpec, FileDataset, Source};
use ldnc_runtime::train::{describe_augment, loader_threads, EvalView, FileBatches, Pipeline};
use serde::Serialize;

/// Arguments of `ldnc data bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Dataset of image files: imagenet:DIR.
    pub spec: String,
    /// Decoding threads (default: one per available core, as training uses).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batches to time (default: one pass over the split). More batches than
    /// one pass continue into the next epoch, or repeat the split with --eval.
    #[arg(long)]
    pub batches: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Side in pixels of the square network input that images are cropped to.
    #[arg(long, default_value_t = 224)]
    pub input_size: usize,
    /// Time the evaluation pipeline (resize and centre crop) on the test split
    /// instead of the training pipeline on the train split.
    #[arg(long)]
    pub eval: bool,
    /// Seed of the shuffle and of the random crops and flips.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The figures of one run.
#[derive(Debug, Serialize)]
struct BenchResult {
    dataset: String,
    /// `train` or `test`.
    split: &'static str,
    /// The augmentation, in words.
    pipeline: String,
    threads: usize,
    available_cores: usize,
    batch_size: usize,
    batches: usize,
    images: usize,
    /// Undecodable images left out of their batches.
    skipped: u64,
    /// Height, width and channels of each image in a batch.
    image_shape: [usize; 3],
    seconds: f64,
    images_per_second: f64,
    images_per_second_per_thread: f64,
    /// Process CPU time, where /proc/self/stat exists.
    cpu_seconds: Option<f64>,
    images_per_cpu_second: Option<f64>,
}

/// Runs `ldnc data bench`.
pub fn run(args: &BenchArgs, quiet: bool) -> Result<()> {
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1, got 0"),
        Some(threads) => threads,
        None => loader_threads(),
    };
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    let spec = DataSpec::parse(&args.spec)?;
    let source = data::open(&spec).with_context(|| format!("failed to open dataset {spec}"))?;
    let Source::Files(dataset) = source else {
        bail!(
            "`{spec}` is read into memory, so it has no decoding pipeline to time. Give an \
             image-file dataset such as imagenet:DIR"
        );
    };

    let side = args.input_size;
    let input = InputSpec {
        height: side,
        width: side,
        channels: 3,
    };
    let pipeline = Pipeline::for_dataset(spec.kind, input, 0, true)?;
    let plan = Plan::new(&dataset, &pipeline, args)?;
    let result = time_batches(&dataset, &plan, threads, quiet)?;

    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
    } else {
        print_text(&mut out, &result)?;
    }
    if result.skipped > 0 {
        tracing::warn!(
            skipped = result.skipped,
            "undecodable images were left out of the timed batches"
        );
    }
    Ok(())
}

/// The timed work: one split, its batch settings and the number of batches.
struct Plan {
    split: &'static str,
    files: Arc<Vec<(PathBuf, u32)>>,
    config: BatchConfig,
    description: String,
    batches: usize,
}

impl Plan {
    /// Picks the split and augmentation as training (or evaluation, with
    /// `--eval`) does, and checks that the split has at least one batch.
    fn new(dataset: &FileDataset, pipeline: &Pipeline, args: &BenchArgs) -> Result<Plan> {
        let (split, files, config, description) = if args.eval {
            let EvalView::Whole(augment) = &pipeline.eval else {
                bail!(
                    "{} is evaluated in tiles, which no loader batches",
                    dataset.name
                );
            };
            let mut config = BatchConfig::eval(args.batch_size);
            config.augment = augment.clone();
            let description = pipeline.eval.describe();
            ("test", &dataset.test, config, description)
        } else {
            let config = BatchConfig::train(args.batch_size, pipeline.train.clone(), args.seed);
            let description = describe_augment(&pipeline.train);
            ("train", &dataset.train, config, description)
        };

        // Training drops the last partial batch and evaluation keeps it.
        let per_pass = if config.drop_last {
            files.len() / args.batch_size
        } else {
            files.len().div_ceil(args.batch_size)
        };
        if per_pass == 0 {
            bail!(
                "the {split} split of {} has {} images, fewer than one batch of {}. Lower \
                 --batch-size",
                dataset.name,
                files.len(),
                args.batch_size
            );
        }
        Ok(Plan {
            split,
            files: Arc::new(files.clone()),
            config,
            description,
            batches: args.batches.unwrap_or(per_pass),
        })
    }
}

/// Pulls `plan.batches` batches through the loader and measures the run.
fn time_batches(
    dataset: &FileDataset,
    plan: &Plan,
    threads: usize,
    quiet: bool,
) -> Result<BenchResult> {
    let norm = dataset.normalization();
    let bar = progress_bar(!quiet, plan.batches);
    let (mut delivered, mut images, mut skipped) = (0, 0, 0);
    let mut image_shape = [0; 3];
    let cpu_start = process_cpu_seconds();
    let started = Instant::now();

    let mut epoch = 0;
    while delivered < plan.batches {
        let mut batches =
            FileBatches::new(Arc::clone(&plan.files), &norm, &plan.config, epoch, threads);
        let before = delivered;
        for batch in batches.by_ref().take(plan.batches - delivered) {
            let batch = batch.with_context(|| format!("failed to load batch {delivered}"))?;
            image_shape = [batch.height, batch.width, batch.channels];
            images += batch.len;
            delivered += 1;
            let rate = images as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{rate:.0} images/s"));
            bar.inc(1);
        }
        skipped += batches.skipped();
        drop(batches);
        if delivered == before {
            bail!(
                "no image of the {} split decoded. Run `ldnc data inspect --verify` to list \
                 the failures",
                plan.split
            );
        }
        // Evaluation reads the split in the same order every time.
        if plan.config.shuffle {
            epoch += 1;
        }
    }

    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_start
        .zip(process_cpu_seconds())
        .map(|(start, end)| end - start);
    bar.finish_and_clear();
    let images_per_second = images as f64 / seconds.max(1e-9);
    Ok(BenchResult {
        dataset: dataset.name.clone(),
        split: plan.split,
        pipeline: plan.description.clone(),
        threads,
        available_cores: loader_threads(),
        batch_size: plan.config.batch_size,
        batches: delivered,
        images,
        skipped,
        image_shape,
        seconds,
        images_per_second,
        images_per_second_per_thread: images_per_second / threads as f64,
        cpu_seconds,
        images_per_cpu_second: cpu_seconds
            .filter(|&cpu| cpu > 0.0)
            .map(|cpu| images as f64 / cpu),
    })
}

fn progress_bar(show: bool, batches: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(batches as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} batches {msg} (ETA {eta})")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar
}

/// Clock ticks per second of the times in `/proc/self/stat` (proc(5): divide
/// by `sysconf(_SC_CLK_TCK)`), which `getconf CLK_TCK` prints as 100 on x86_64.
///
/// NOTE: a kernel with another `USER_HZ` would scale every CPU-time figure.
const TICKS_PER_SECOND: f64 = 100.0;

/// Returns the user plus system CPU time of this process, all threads
/// included, or `None` where `/proc/self/stat` does not exist.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name in field 2 may contain spaces, so count fields after its `)`.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) are the 12th and 13th after the name.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64 / TICKS_PER_SECOND)
}

fn print_text(out: &mut impl Write, result: &BenchResult) -> io::Result<()> {
    let [height, width, channels] = result.image_shape;
    writeln!(
        out,
        "{} {} split: {} ({height}x{width}x{channels} per image)",
        result.dataset, result.split, result.pipeline
    )?;
    let plural = if result.threads == 1 { "" } else { "s" };
    writeln!(
        out,
        "  batch {}, {} decoding thread{plural} ({} cores available)",
        result.batch_size, result.threads, result.available_cores
    )?;
    writeln!(
        out,
        "  {} images in {} batches in {:.2} s: {:.1} images/s, {:.1} images/s per thread",
        result.images,
        result.batches,
        result.seconds,
        result.images_per_second,
        result.images_per_second_per_thread
    )?;
    if let (Some(cpu), Some(per_cpu)) = (result.cpu_seconds, result.images_per_cpu_second) {
        writeln!(
            out,
            "  CPU time {cpu:.2} s: {per_cpu:.1} images per CPU-second"
        )?;
    }
    if result.skipped > 0 {
        writeln!(out, "  {} undecodable images left out", result.skipped)?;
    }
    Ok(())
}
