//! The streaming executor: a job's stages wired with bounded channels.
//!
//! Each stage runs on its own task and hands batches to the next through a channel of
//! `run.channel_capacity` batches: back-pressure from the slowest stage (the models, once
//! they exist) is what keeps memory flat whatever the input size.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use abridge_operators::dedup::Deduplicate;
use abridge_operators::index::RunIndexer;
use abridge_operators::scan::OpenScan;
use abridge_operators::scope::{DoneTickets, RunScope, Shard};
use abridge_operators::sink::{ParquetSink, PublishObserver};
use abridge_operators::stage::BuildContext;
use abridge_operators::stop::{StopLevel, StopSignal};
use abridge_operators::{Operator, OperatorError, SendableRecordBatchStream, StageCounters};
use arrow::datatypes::SchemaRef;
use datafusion::physical_plan::stream::{RecordBatchReceiverStream, RecordBatchStreamAdapter};
use futures::StreamExt;

use crate::error::PipelineError;
use crate::job::{Job, JobError, reserved_columns};
use crate::table::manifest::{
    InputFileFailure, QueryOutcome, RunManifest, RunStart, ShardRecord, StageSummary, now_rfc3339,
};
use crate::table::plan::{self, ResumeMode};
use crate::table::{self, RunRecord, TableRun};

/// Options of one run that are not part of the job.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Read at most this many input rows (after `input.where`).
    pub limit: Option<usize>,
    /// Whether to continue the job's unfinished run.
    pub resume: ResumeMode,
    /// Process only this shard of the input (`--shard i/n --run-group NAME`).
    pub shard: Option<ShardRecord>,
    /// Ends the run early and cleanly ([`PreparedRun::execute`]).
    pub stop: StopSignal,
}

/// Live counters for a progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Rows in the input files (before `where`), or the limit if lower: a ceiling for ETAs.
    pub expected_rows: u64,
    /// Rows read so far.
    pub read: StageCounters,
    /// Rows written so far.
    pub written: StageCounters,
}

/// A run whose input is open and whose stages are built, so that every configuration
/// error has been reported before anything is written.
pub struct PreparedRun {
    /// The run's place in the output table, and its lock until it ends.
    table: TableRun,
    job: Job,
    /// What the table records of the job.
    record: RunRecord,
    options: RunOptions,
    fingerprint: String,
    scan: OpenScan,
    stages: Vec<(Box<dyn Operator>, StageCounters)>,
    /// The job's index, committed with each published output file.
    index: Option<Arc<RunIndexer>>,
    /// The similarity queries and their thresholds, for the run's summary.
    queries: Vec<(String, f32)>,
    notes: Vec<String>,
    progress: Progress,
}

/// A job that classifies topics must not silently overwrite a topic column of its input.
fn refuse_input_topic(job: &Job, input: &SchemaRef) -> Result<(), PipelineError> {
    let input_config = &job.config.input;
    let name = input_config.columns.topic.as_deref().unwrap_or("topic");
    if input.index_of(name).is_ok() && !input_config.drop.iter().any(|d| d == name) {
        return Err(JobError::Invalid {
            path: job.path.clone(),
            key: "filter.topics".into(),
            message: format!(
                "the input's `{name}` column would be replaced by the computed topic; \
                 drop it (input.drop = [\"{name}\"]) or remove [filter.topics]"
            ),
        }
        .into());
    }
    Ok(())
}

/// Opens the job's input and builds its stages: the input's (scan, normalize), the run's
/// (scope, dedup), then the job's table of stages ([`crate::job::STAGES`]) in order, and
/// the index the sink commits with.
pub async fn prepare(job: Job, options: &RunOptions) -> Result<PreparedRun, PipelineError> {
    let input = &job.config.input;
    let fail = |e| stage_error(&job.path, e);
    let read = StageCounters::default();
    let scan = input
        .scan(options.limit, job.config.run.batch_size)
        .open(read.clone())
        .await
        .map_err(|source| match source {
            OperatorError::Where { .. } => PipelineError::JobDoesNotFitInput {
                job: job.path.clone(),
                source: Box::new(source),
            },
            source => PipelineError::Input {
                job: job.path.clone(),
                source: Box::new(source),
            },
        })?;
    let normalize = input
        .normalize(&scan.schema, &reserved_columns())
        .map_err(fail)?;
    let record = job.record();
    // Before anything of the output is read: a second live run is refused here, by name.
    let (mut table, mut notes) = TableRun::open(
        &record,
        options.resume,
        options.limit,
        options.shard.as_ref(),
        &options.stop,
    )?;
    let fingerprint = job.results_fingerprint()?;

    // This shard's rows, less those done by earlier runs (`run.skip_done`) and those a
    // resumed run committed.
    let done = match job.config.run.skip_done {
        true => {
            let done = plan::done_tickets(&record.output, &fingerprint)?;
            notes.push(format!(
                "skip_done: {} tickets were processed by earlier runs with these settings; \
                 unchanged ones are skipped",
                done.len()
            ));
            done
        }
        false => DoneTickets::default(),
    };
    let shard = options.shard.as_ref().map(|s| Shard {
        index: s.index,
        count: s.count,
    });
    let normalized = normalize.schema();
    let scope = RunScope::try_new(&normalized, shard, done).map_err(fail)?;
    let dedup = Deduplicate::try_new(scope.schema())
        .map_err(fail)?
        .resuming(table.take_committed_keys());
    let schema = dedup.schema();
    let run_stages: [Box<dyn Operator>; 3] =
        [Box::new(normalize), Box::new(scope), Box::new(dedup)];

    if job
        .config
        .filter
        .as_ref()
        .is_some_and(|f| f.topics.is_some())
    {
        refuse_input_topic(&job, &scan.schema)?;
    }
    let sections = job.config.sections();
    let mut context = BuildContext::new(job.config.view(&sections), schema);
    for (_, stage) in job.config.stages() {
        stage.build(&mut context).await.map_err(fail)?;
    }
    let built = context.finish();
    notes.extend(built.notes);
    let index = match (&job.config.index, &job.config.embed, &built.encoder) {
        (Some(config), ..) if options.shard.is_some() => {
            notes.push(format!(
                "shard runs do not write the index ({}): the next unsharded run of the job \
                 rebuilds it from the table",
                config.path.display()
            ));
            None
        }
        (Some(config), Some(embed), Some(encoder)) => {
            let (committer, rebuilt) = table::index::open_index_for_run(
                &config.path,
                encoder.dim(),
                &embed.model,
                encoder.fingerprint(),
                &record.output,
                table.resuming(),
            )?;
            if let Some(rows) = rebuilt {
                notes.push(format!(
                    "index {} did not match the output table (new index, or a run \
                     interrupted between a file's commit and the index's): brought in \
                     step from the table's files ({rows} tickets)",
                    config.path.display()
                ));
            }
            Some(Arc::new(RunIndexer {
                committer,
                run_id: table.run_id().to_string(),
            }))
        }
        _ => None,
    };
    let stages = run_stages
        .into_iter()
        .map(|op| (op, StageCounters::default()))
        .chain(built.operators)
        .collect();
    let expected_rows = match options.limit {
        Some(limit) => scan.file_rows.min(limit as u64),
        None => scan.file_rows,
    };
    Ok(PreparedRun {
        table,
        job,
        record,
        options: options.clone(),
        fingerprint,
        scan,
        stages,
        index,
        queries: built.queries,
        notes,
        progress: Progress {
            expected_rows,
            read,
            written: StageCounters::default(),
        },
    })
}

/// A stage that could not be built: a setting (exit code 2, by key), a model, or the
/// input's columns.
fn stage_error(job: &Path, e: OperatorError) -> PipelineError {
    match e {
        OperatorError::Config { key, message } => JobError::Invalid {
            path: job.to_path_buf(),
            key,
            message,
        }
        .into(),
        e @ (OperatorError::Encoder(_) | OperatorError::Generator(_)) => PipelineError::Model {
            job: job.to_path_buf(),
            source: Box::new(e),
        },
        e => PipelineError::JobDoesNotFitInput {
            job: job.to_path_buf(),
            source: Box::new(e),
        },
    }
}

impl PreparedRun {
    /// Counters to show progress from while [`PreparedRun::execute`] runs.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        self.table.run_id()
    }

    /// What the preparation did that the user should know (e.g. an index rebuilt).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The folder the run writes.
    pub fn run_dir(&self) -> &Path {
        self.table.run_dir()
    }

    /// Runs every stage to the end, records the job and the manifest beside the output,
    /// and returns the manifest.
    ///
    /// `options.stop` ends it early and cleanly: at [`StopLevel::Drain`] no more input is read and
    /// the rows in the stages finish and are published, for up to `run.stop_grace_s`;
    /// then (or on [`StopLevel::Abort`]) the file being written is abandoned. Either way
    /// the sink's writer has ended before the manifest is written as interrupted, and the
    /// lock is released last, when this returns.
    pub async fn execute(self) -> Result<RunManifest, PipelineError> {
        let stop = &self.options.stop;
        let started = Instant::now();
        let input_files = self.scan.files.iter().map(|f| f.display().to_string());
        let mut manifest = RunManifest::start(
            self.table.run_id(),
            &self.record,
            input_files.collect(),
            RunStart {
                fingerprint: self.fingerprint.clone(),
                limit: self.options.limit,
                shard: self.options.shard.clone(),
            },
        );
        self.table.begin(&self.record, &mut manifest)?;

        let grace = Duration::from_secs_f64(self.job.config.run.stop_grace_s);
        let grace_timer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.reached(StopLevel::Drain).await;
                tokio::select! {
                    () = tokio::time::sleep(grace) => stop.abort(),
                    () = stop.reached(StopLevel::Abort) => {}
                }
            })
        };
        let cut = Arc::new(AtomicBool::new(false));
        let input = until_drained(self.scan.stream, stop.clone(), Arc::clone(&cut));
        let capacity = self.job.config.run.channel_capacity;
        let chained = chain(input, &self.stages, capacity);
        let output = &self.job.config.output;
        let previous = self.table.previous().clone();
        let progress = self.table.progress(
            &manifest,
            self.progress.expected_rows,
            self.progress.read.clone(),
        );
        let sink = ParquetSink {
            dir: self.table.run_dir().to_path_buf(),
            run_id: self.table.run_id().to_string(),
            commit_every_rows: output.commit_every_rows,
            commit_every: Duration::from_secs_f64(output.commit_every_s),
            row_group_rows: output.row_group_rows,
            previous: previous.clone(),
            observers: self
                .index
                .clone()
                .map(|i| i as Arc<dyn PublishObserver>)
                .into_iter()
                .chain([progress])
                .collect(),
            stop: stop.clone(),
        };
        // The sink returns only after its writer thread has ended, stopped or not.
        let outcome = match chained {
            Err(err) => Err(err),
            Ok(stream) => sink.write(stream, self.progress.written.clone()).await,
        };
        grace_timer.abort();
        let interrupted =
            cut.load(Ordering::Acquire) || matches!(outcome, Err(OperatorError::Stopped));

        // Counts are final here: every stage task has finished or been dropped.
        let named = |stage: &str, counters: &StageCounters| StageSummary {
            stage: stage.into(),
            metrics: counters.snapshot(),
        };
        let stages = std::iter::once(named("scan", &self.progress.read))
            .chain(self.stages.iter().map(|(op, c)| named(op.name(), c)))
            .chain([named("sink", &self.progress.written)]);
        manifest.count(stages.collect());
        if let Ok(failed) = self.scan.failed.lock() {
            manifest.input_files_failed = failed
                .iter()
                .map(|f| InputFileFailure {
                    path: f.path.display().to_string(),
                    error: f.error.clone(),
                })
                .collect();
        }
        manifest.finished_at = Some(now_rfc3339());
        manifest.updated_at = manifest.finished_at.clone();
        manifest.elapsed_s = started.elapsed().as_secs_f64();

        let report = match outcome {
            _ if interrupted => return Err(self.table.interrupt(manifest, stop)),
            Err(source) => return Err(self.table.fail(manifest, source)),
            Ok(report) => report,
        };
        manifest.queries = self
            .queries
            .iter()
            .map(|(query, threshold)| QueryOutcome {
                query: query.clone(),
                threshold: *threshold,
                kept: report.kept_by_query.get(query).copied().unwrap_or(0),
            })
            .collect();
        let accounted = manifest.rows_resumed
            + manifest.rows_skipped_done
            + manifest.rows_other_shards
            + manifest.duplicates_dropped
            + (report.rows - previous.rows);
        if accounted != manifest.rows_read {
            let bug = OperatorError::StageSchema(format!(
                "row conservation failed: {} rows read, but {accounted} accounted for \
                 (written, duplicates, skipped); this is a bug in abridge",
                manifest.rows_read
            ));
            return Err(self.table.fail(manifest, bug));
        }
        self.table.commit(manifest, &report)
    }
}

/// `input` until a stop drains the run (then `cut` is set): what the scan has not read
/// is left for the run's next attempt.
fn until_drained(
    input: SendableRecordBatchStream,
    stop: StopSignal,
    cut: Arc<AtomicBool>,
) -> SendableRecordBatchStream {
    let schema = input.schema();
    let drained = async move {
        stop.reached(StopLevel::Drain).await;
        cut.store(true, Ordering::Release);
    };
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        input.take_until(drained),
    ))
}

/// Wires `stages` after `input`, each driven on its own task behind a bounded channel.
fn chain(
    input: SendableRecordBatchStream,
    stages: &[(Box<dyn Operator>, StageCounters)],
    capacity: usize,
) -> Result<SendableRecordBatchStream, OperatorError> {
    let mut stream = bounded(input, capacity);
    for (stage, metrics) in stages {
        stream = bounded(stage.execute(stream, metrics.clone())?, capacity);
    }
    Ok(stream)
}

/// Drives `input` on its own task into a channel of `capacity` batches.
fn bounded(mut input: SendableRecordBatchStream, capacity: usize) -> SendableRecordBatchStream {
    let mut builder = RecordBatchReceiverStream::builder(input.schema(), capacity);
    let tx = builder.tx();
    builder.spawn(async move {
        while let Some(batch) = input.next().await {
            let failed = batch.is_err();
            if tx.send(batch).await.is_err() || failed {
                break; // downstream is gone, or the error has been passed on
            }
        }
        Ok(())
    });
    builder.build()
}
