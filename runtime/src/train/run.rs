//! The epoch loop: trains a session from a position to the last epoch,
//! evaluating, logging metrics and writing a checkpoint after every epoch.

use std::io::Write;
use std::time::Instant;

use crate::checkpoint::{self, Meta};
use crate::data::{BatchConfig, Dataset};
use crate::exec::StepParams;
use crate::metrics::Hits;

use super::data::{Data, TrainSource};
use super::files::{append_metrics, write_curves, RunFiles};
use super::pipeline::Pipeline;
use super::report::{epoch_line, epoch_metrics, progress_bar, EpochFigures, EpochMetrics};
use super::schedule::learning_rate;
use super::session::Session;
use super::{TrainConfig, TrainError};

/// Position to continue from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Position {
    pub epoch: usize,
    pub step: u64,
}

/// Trains `session` on the in-memory `data` with CIFAR-style pad-and-crop
/// (`config.crop_padding`, `config.flip`), from `start` to `config.epochs`,
/// writing into `files`; returns the metrics of every epoch run.
pub fn train(
    session: &mut Session,
    data: &Dataset,
    config: &TrainConfig,
    files: &RunFiles,
    start: Position,
) -> Result<Vec<EpochMetrics>, TrainError> {
    let pipeline = Pipeline::cifar(config.crop_padding, config.flip);
    train_with(session, Data::Memory(data), &pipeline, config, files, start)
}

/// Trains `session` on `data` seen through `pipeline`, from `start` to
/// `config.epochs`, writing into `files`; returns the metrics of every epoch
/// run. Every check of the data against the network runs before the first step.
pub fn train_with(
    session: &mut Session,
    data: Data,
    pipeline: &Pipeline,
    config: &TrainConfig,
    files: &RunFiles,
    start: Position,
) -> Result<Vec<EpochMetrics>, TrainError> {
    if config.batch == 0 || config.epochs == 0 {
        return Err(TrainError::EmptyConfig {
            batch: config.batch,
            epochs: config.epochs,
        });
    }
    session.check_data(data, pipeline)?;
    check_split_sizes(data, &session.net.spec.name, config.batch)?;
    // A fresh run takes the class weights from the training labels, and a
    // resumed one keeps those its checkpoint restored.
    let fresh = start.epoch == 0 && start.step == 0;
    if let (true, Some(weights)) = (fresh, data.class_weights()) {
        session.set_class_weights(weights)?;
        tracing::info!(?weights, "loss class weights from the train split");
    }
    std::fs::create_dir_all(&files.dir).map_err(|source| TrainError::Output {
        path: files.dir.clone(),
        source,
    })?;
    // The last partial batch is dropped, so an epoch has this many whole batches.
    let steps_per_epoch = (data.train_len() / config.batch) as u64;
    let total_steps = steps_per_epoch * config.epochs as u64;
    let normalization = data.normalization();
    let source = TrainSource::new(data);
    let mut step = start.step;
    let mut history = Vec::new();

    for epoch in start.epoch..config.epochs {
        let started = Instant::now();
        let mut batch_config =
            BatchConfig::train(config.batch, pipeline.train.clone(), config.seed);
        batch_config.ignore_label = data.ignore_label();
        let bar = progress_bar(config.show_progress, steps_per_epoch, epoch, config.epochs);
        let (mut loss_sum, mut hits, mut seen) = (0.0f64, Hits::default(), 0usize);
        let mut lr = config.lr;
        let mut batches = source.epoch(&normalization, &batch_config, epoch);
        for batch in batches.by_ref() {
            let batch = batch?;
            if config.max_steps.is_some_and(|max| step >= max) {
                bar.abandon();
                return Ok(history);
            }
            lr = learning_rate(config.lr, config.schedule, step, total_steps, epoch);
            let params = StepParams {
                lr: lr as f32,
                seed: config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step,
            };
            let (loss, batch_hits) =
                session.train_step(&batch.images, &batch.labels, batch.len, params)?;
            step += 1;
            if !loss.is_finite() {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    value: loss,
                    step,
                    epoch: epoch + 1,
                    checkpoint: if epoch > 0 {
                        files.checkpoint().display().to_string()
                    } else {
                        "not written yet (the first epoch did not finish)".into()
                    },
                });
            }
            loss_sum += loss as f64 * batch.len as f64;
            hits.correct += batch_hits.correct;
            hits.scored += batch_hits.scored;
            seen += batch.len;
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}%  {rate:.0} img/s",
                loss_sum / seen as f64,
                100.0 * hits.correct as f64 / hits.scored.max(1) as f64
            ));
            bar.inc(1);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let train_skipped = batches.skipped();
        drop(batches);
        bar.finish_and_clear();
        if train_skipped > 0 {
            tracing::warn!(
                epoch = epoch + 1,
                skipped = train_skipped,
                "undecodable train images left out of the epoch"
            );
        }
        // The split has at least one batch, so an epoch without a step
        // means that every batch was left out.
        if seen == 0 {
            return Err(TrainError::NothingDecoded {
                dataset: data.name().to_string(),
                epoch: epoch + 1,
                skipped: train_skipped,
            });
        }
        session.sync()?;

        let evaluation = session.evaluate(data, &pipeline.eval, config.batch)?;
        let row = epoch_metrics(
            EpochFigures {
                epoch: epoch + 1,
                step,
                lr,
                train_loss: loss_sum / seen.max(1) as f64,
                train_hits: hits,
                skipped: train_skipped,
                images: seen,
                train_seconds,
                seconds: started.elapsed().as_secs_f64(),
            },
            &evaluation,
            data.is_segmentation(),
        );
        tracing::info!(
            epoch = row.epoch,
            train_loss = row.train_loss,
            test_accuracy = row.test_accuracy,
            images_per_second = row.images_per_second,
            "epoch finished"
        );
        if config.show_progress {
            // The epoch line is only a progress display, and metrics.jsonl keeps
            // every epoch, so a closed stdout (`ldnc train ... | head`) must not
            // stop training the way `println!` would by panicking.
            let _ = writeln!(std::io::stdout(), "{}", epoch_line(&row, config.epochs));
        }
        append_metrics(&files.metrics(), &row)?;
        let meta = Meta {
            network: session.net.spec.name.clone(),
            spec_json: serde_json::to_string(&session.net.spec).expect("spec serialises"),
            epoch: epoch + 1,
            step,
            seed: config.seed,
            config_json: serde_json::to_string(config).expect("config serialises"),
        };
        checkpoint::save(&files.checkpoint(), &session.store, &meta)?;
        history.push(row);
        write_curves(files)?;
    }
    Ok(history)
}

/// Rejects a train split with fewer images than one batch (the last partial
/// batch is dropped, so it would never train) and an empty test split.
fn check_split_sizes(data: Data, network: &str, batch: usize) -> Result<(), TrainError> {
    let incompatible = |reason: String| TrainError::Incompatible {
        dataset: data.name().to_string(),
        network: network.to_string(),
        reason,
    };
    if data.train_len() < batch {
        return Err(incompatible(format!(
            "the train split has {} images, fewer than one batch of {batch}; lower --batch or \
             check the dataset folder",
            data.train_len()
        )));
    }
    if data.test_len() == 0 {
        return Err(incompatible(
            "the test split has no images; check the dataset folder".into(),
        ));
    }
    Ok(())
}
