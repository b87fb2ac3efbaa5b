//! `ldnc data inspect`: split sizes, class counts and channel statistics of a
//! dataset, with optional full decoding (`--verify`) and a contact sheet PNG.
//! `ldnc data bench` (in `cli_data_bench.rs`) times the image-file input pipeline.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde::Serialize;

use ldnc_runtime::data::{
    self, contact_sheet, decode_image_file, sample_rng, Augment, DataSpec, Dataset, FileDataset,
    Source, Split,
};

// A path relative to this file, so that tests which include this file by
// path find the module too.
#[path = "cli_data_bench.rs"]
mod bench;

/// Arguments of `ldnc data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The `ldnc data` subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print a dataset's splits, classes and channel statistics.
    Inspect(InspectArgs),
    /// Time the input pipeline of an image-file dataset: images/s and per thread.
    Bench(bench::BenchArgs),
}

/// Arguments of `ldnc data inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset: fashion-mnist[:DIR|:full], cifar10:DIR, cifar100:DIR,
    /// cifar100-coarse:DIR, svhn:DIR, svhn+extra:DIR, imagenet:DIR or camvid:DIR.
    pub spec: String,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Decode every item and list the ones that fail.
    #[arg(long)]
    pub verify: bool,
    /// Write a contact sheet of labelled train samples to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    pub sheet: Option<PathBuf>,
    /// Number of samples on the contact sheet.
    #[arg(long, default_value_t = 64)]
    pub sheet_count: usize,
}

#[derive(Debug, Serialize)]
struct SplitReport {
    name: String,
    len: usize,
    /// Height, width and channels, or null when images differ in size.
    shape: Option<[usize; 3]>,
    images_per_class: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    dataset: String,
    classes: usize,
    class_names: Vec<String>,
    splits: Vec<SplitReport>,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// The source of the statistics: the train split, or published constants.
    stats_source: String,
    ignore_label: Option<u32>,
    class_weights: Option<Vec<f32>>,
    verified: Option<usize>,
    failures: Vec<String>,
}

/// Runs an `ldnc data` subcommand.
pub fn run(args: DataArgs, quiet: bool) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Inspect(args) => inspect(args),
        DataCommand::Bench(args) => bench::run(&args, quiet),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let spec = DataSpec::parse(&args.spec)?;
    let source = data::open(&spec).with_context(|| format!("failed to open dataset {spec}"))?;
    let mut report = match &source {
        Source::Memory(dataset) => memory_report(dataset),
        Source::Files(dataset) => files_report(dataset),
    };

    if args.verify {
        let (verified, failures) = match &source {
            // Loading decoded and range-checked every item already.
            Source::Memory(dataset) => (split_total(dataset), Vec::new()),
            Source::Files(dataset) => verify_files(dataset),
        };
        report.verified = Some(verified);
        report.failures = failures;
    }

    let mut legend = Vec::new();
    if let Some(path) = &args.sheet {
        let (split, names) = match &source {
            Source::Memory(dataset) => (dataset.train.clone(), dataset.class_names.clone()),
            Source::Files(dataset) => (
                decode_preview(dataset, args.sheet_count)?,
                dataset.class_names.clone(),
            ),
        };
        let indices = spread_indices(split.len, args.sheet_count);
        let scale = (96 / split.height.max(split.width).max(1)).clamp(1, 4) as u32;
        contact_sheet(&split, &indices, 8, scale)
            .save(path)
            .with_context(|| format!("failed to write contact sheet {}", path.display()))?;
        let mut shown: Vec<u32> = indices.iter().map(|&i| split.labels[i]).collect();
        shown.sort();
        shown.dedup();
        legend = shown
            .into_iter()
            .map(|label| {
                format!(
                    "{label}: {}",
                    names.get(label as usize).map_or("?", String::as_str)
                )
            })
            .collect();
    }

    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_text(&mut out, &report)?;
        if let Some(path) = &args.sheet {
            writeln!(
                out,
                "contact sheet: {} (labels: {})",
                path.display(),
                legend.join(", ")
            )?;
        }
    }
    if !report.failures.is_empty() {
        anyhow::bail!("{} items failed to decode", report.failures.len());
    }
    Ok(())
}

fn split_total(dataset: &Dataset) -> usize {
    dataset.train.len + dataset.test.len + dataset.val.as_ref().map_or(0, |v| v.len)
}

fn split_report(name: &str, split: &Split, dataset: &Dataset) -> SplitReport {
    let counts = if split.is_segmentation() {
        // Count images in which each class appears.
        let mut counts = vec![0u64; dataset.classes];
        for index in 0..split.len {
            let mut present = vec![false; dataset.classes];
            for &label in split.label(index) {
                if let Some(flag) = present.get_mut(label as usize) {
                    *flag = true;
                }
            }
            for (count, flag) in counts.iter_mut().zip(present) {
                *count += flag as u64;
            }
        }
        counts
    } else {
        split.class_counts(dataset.classes, dataset.ignore_label)
    };
    SplitReport {
        name: name.to_string(),
        len: split.len,
        shape: Some([split.height, split.width, split.channels]),
        images_per_class: counts,
    }
}

fn memory_report(dataset: &Dataset) -> Report {
    let mut splits = vec![split_report("train", &dataset.train, dataset)];
    if let Some(val) = &dataset.val {
        splits.push(split_report("val", val, dataset));
    }
    splits.push(split_report("test", &dataset.test, dataset));
    Report {
        dataset: dataset.name.clone(),
        classes: dataset.classes,
        class_names: dataset.class_names.clone(),
        splits,
        mean: dataset.mean.clone(),
        std: dataset.std.clone(),
        stats_source: "computed on the train split".into(),
        ignore_label: dataset.ignore_label,
        class_weights: dataset.class_weights.clone(),
        verified: None,
        failures: Vec::new(),
    }
}

fn files_report(dataset: &FileDataset) -> Report {
    let split = |name: &str, files: &[(PathBuf, u32)]| {
        let mut counts = vec![0u64; dataset.classes];
        for (_, label) in files {
            counts[*label as usize] += 1;
        }
        SplitReport {
            name: name.to_string(),
            len: files.len(),
            shape: None,
            images_per_class: counts,
        }
    };
    Report {
        dataset: dataset.name.clone(),
        classes: dataset.classes,
        class_names: dataset.class_names.clone(),
        splits: vec![split("train", &dataset.train), split("test", &dataset.test)],
        mean: dataset.mean.clone(),
        std: dataset.std.clone(),
        stats_source: "published ImageNet constants, not computed".into(),
        ignore_label: None,
        class_weights: None,
        verified: None,
        failures: Vec::new(),
    }
}

fn verify_files(dataset: &FileDataset) -> (usize, Vec<String>) {
    let all: Vec<&PathBuf> = dataset
        .train
        .iter()
        .chain(&dataset.test)
        .map(|(p, _)| p)
        .collect();
    let failures: Vec<String> = all
        .par_iter()
        .filter_map(|path| {
            let error = anyhow::Error::from(decode_image_file(path).err()?);
            Some(format!("{error:#}"))
        })
        .collect();
    (all.len() - failures.len(), failures)
}

/// Decodes `count` train images spread over the file list into a 64x64 split.
fn decode_preview(dataset: &FileDataset, count: usize) -> anyhow::Result<Split> {
    let side = 64;
    let augment = Augment::ResizeCenterCrop {
        resize: side,
        crop: side,
    };
    let mut split = Split {
        images: Vec::new(),
        labels: Vec::new(),
        height: side,
        width: side,
        channels: 3,
        len: 0,
    };
    for index in spread_indices(dataset.train.len(), count) {
        let (path, label) = &dataset.train[index];
        let image = decode_image_file(path)?.to_rgb8();
        let sample = data::augment_image(
            &augment,
            image.as_raw(),
            image.height() as usize,
            image.width() as usize,
            3,
            &mut sample_rng(0, 0, index as u64),
        );
        split.images.extend_from_slice(&sample.pixels);
        split.labels.push(*label);
        split.len += 1;
    }
    Ok(split)
}

/// Picks up to `count` indices spread evenly over `0..len`.
fn spread_indices(len: usize, count: usize) -> Vec<usize> {
    let count = count.min(len);
    (0..count).map(|i| i * len / count).collect()
}

fn print_text(out: &mut impl Write, report: &Report) -> io::Result<()> {
    writeln!(
        out,
        "dataset {} ({} classes)",
        report.dataset, report.classes
    )?;
    for split in &report.splits {
        let shape = split.shape.map_or("varying size".to_string(), |[h, w, c]| {
            format!("{h}x{w}x{c}")
        });
        writeln!(out, "  {:<5} {:>9} images  {shape}", split.name, split.len)?;
    }
    writeln!(
        out,
        "  mean {:?}  std {:?} ({})",
        report.mean, report.std, report.stats_source
    )?;
    if let Some(ignore) = report.ignore_label {
        writeln!(out, "  ignored label {ignore}")?;
    }
    writeln!(
        out,
        "  {:<4} {:<24} {}",
        "id",
        "class",
        report
            .splits
            .iter()
            .map(|s| format!("{:>9}", s.name))
            .collect::<String>()
    )?;
    for (class, name) in report.class_names.iter().enumerate() {
        let counts: String = report
            .splits
            .iter()
            .map(|s| format!("{:>9}", s.images_per_class[class]))
            .collect();
        let weight = report
            .class_weights
            .as_ref()
            .map_or(String::new(), |w| format!("  weight {:.3}", w[class]));
        writeln!(out, "  {class:<4} {name:<24} {counts}{weight}")?;
    }
    if let Some(verified) = report.verified {
        writeln!(
            out,
            "verified: {verified} items decoded, {} failed",
            report.failures.len()
        )?;
        for failure in &report.failures {
            writeln!(out, "  {failure}")?;
        }
    }
    Ok(())
}
