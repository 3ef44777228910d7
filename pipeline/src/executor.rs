//! The streaming executor: a job's stages wired with bounded channels.
//!
//! Each stage runs on its own task and hands batches to the next through a channel of
//! `run.channel_capacity` batches: back-pressure from the slowest stage (the models, once
//! they exist) is what keeps memory flat whatever the input size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use abridge_operators::dedup::Deduplicate;
use abridge_operators::embed::Embed;
use abridge_operators::encoder::bert::BertEncoder;
use abridge_operators::encoder::{EncoderError, EncoderWorker};
use abridge_operators::filter::SemanticFilter;
use abridge_operators::index::{IndexCommitter, IndexStage};
use abridge_operators::normalize::Normalize;
use abridge_operators::quality::{QualitySettings, quality_metrics};
use abridge_operators::scan::{OpenScan, ParquetScan};
use abridge_operators::sink::{ParquetSink, SinkReport};
use abridge_operators::{Operator, OperatorError, OperatorMetrics, SendableRecordBatchStream};
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use futures::StreamExt;

use crate::error::PipelineError;
use crate::job::{Job, JobError};
use crate::lock::OutputLock;
use crate::retrieval;
use crate::run::{
    self, InputFileFailure, JOB_RECORD, RUN_DIR_PREFIX, RunManifest, RunStatus, StageSummary,
};
use crate::summarizer;

/// Options of one run that are not part of the job.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Read at most this many input rows (after `input.where`).
    pub limit: Option<usize>,
}

/// Live counters for a progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Rows in the input files (before `where`), or the limit if lower: a ceiling for ETAs.
    pub expected_rows: u64,
    /// Rows read so far.
    pub read: OperatorMetrics,
    /// Rows written so far.
    pub written: OperatorMetrics,
}

/// A run whose input is open and whose stages are built, so that every configuration
/// error has been reported before anything is written.
pub struct PreparedRun {
    /// Held until the run ends (dropped with it).
    _lock: OutputLock,
    job: Job,
    run_id: String,
    run_dir: PathBuf,
    scan: OpenScan,
    stages: Vec<(Box<dyn Operator>, OperatorMetrics)>,
    /// The job's index writer, committed after the output files and before the manifest.
    index: Option<IndexCommitter>,
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

/// Opens the job's input and builds its stages.
pub async fn prepare(job: Job, options: &RunOptions) -> Result<PreparedRun, PipelineError> {
    let input = &job.config.input;
    let scan = ParquetScan {
        path: input.path.clone(),
        where_clause: input.where_clause.clone(),
        limit: options.limit,
        batch_size: job.config.run.batch_size,
    };
    let read = OperatorMetrics::default();
    let scan = scan
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
    let doesnt_fit = |source| PipelineError::JobDoesNotFitInput {
        job: job.path.clone(),
        source: Box::new(source),
    };
    let normalize = Normalize::try_new(&input.columns, &scan.schema, &input.path, &input.drop)
        .map_err(doesnt_fit)?;
    let dedup = Deduplicate::try_new(normalize.schema()).map_err(doesnt_fit)?;
    let mut stages: Vec<(Box<dyn Operator>, OperatorMetrics)> = vec![
        (Box::new(normalize), OperatorMetrics::default()),
        (Box::new(dedup), OperatorMetrics::default()),
    ];
    let last_schema = |stages: &[(Box<dyn Operator>, OperatorMetrics)]| {
        stages
            .last()
            .map(|(s, _)| s.schema())
            .unwrap_or_else(|| Arc::new(Schema::empty()))
    };
    let run_id = run::new_run_id();
    let mut notes = Vec::new();
    // Before the index is opened: a second live run is refused here, by name.
    let (lock, cleared) = OutputLock::acquire(&job.config.output.path, &run_id)?;
    notes.extend(cleared);
    let mut index = None;
    let mut summary_encoder = None;
    if let Some(embed) = &job.config.embed {
        let model_error = |e| PipelineError::Model {
            job: job.path.clone(),
            source: Box::new(OperatorError::Encoder(Box::new(e))),
        };
        let device = embed.candle_device().map_err(|message| JobError::Invalid {
            path: job.path.clone(),
            key: "embed.device".into(),
            message,
        })?;
        let (dir, batch_size) = (embed.model.clone(), embed.batch_size);
        let encoder =
            tokio::task::spawn_blocking(move || BertEncoder::load(&dir, &device, batch_size))
                .await
                .map_err(|_| model_error(EncoderError::WorkerGone))?
                .map_err(model_error)?;
        let worker = EncoderWorker::spawn(Arc::new(encoder)).map_err(model_error)?;
        let stage = Embed::try_new(
            worker.clone(),
            embed.input.as_deref(),
            &last_schema(&stages),
        )
        .map_err(doesnt_fit)?;
        stages.push((Box::new(stage), OperatorMetrics::default()));

        if let Some(filter) = &job.config.filter {
            if filter.topics.is_some() {
                refuse_input_topic(&job, &scan.schema)?;
            }
            let queries = match &filter.similarity {
                Some(config) => retrieval::similarity_queries(config, &worker, &job.path).await?,
                None => Vec::new(),
            };
            let topics = match &filter.topics {
                Some(config) => Some(retrieval::topic_rule(config, &worker, &job.path).await?),
                None => None,
            };
            let stage = SemanticFilter::try_new(&last_schema(&stages), queries, topics)
                .map_err(doesnt_fit)?;
            stages.push((Box::new(stage), OperatorMetrics::default()));
        }

        if let Some(config) = &job.config.index {
            let (committer, rebuilt) = retrieval::open_index_for_run(
                &config.path,
                worker.dim(),
                &embed.model,
                &job.config.output.path,
            )?;
            if let Some(rows) = rebuilt {
                notes.push(format!(
                    "index {} did not match the output table's committed runs (new index, or \
                     a run interrupted between its two commits): rebuilt from them ({rows} tickets)",
                    config.path.display()
                ));
            }
            let stage = IndexStage::try_new(committer.clone(), &run_id, &last_schema(&stages))
                .map_err(doesnt_fit)?;
            stages.push((Box::new(stage), OperatorMetrics::default()));
            index = Some(committer);
        }
        summary_encoder = Some(worker);
    }

    if let Some(config) = &job.config.summarize {
        let metrics = &job.config.metrics;
        let (stage, note) = summarizer::summarize_stage(
            config,
            metrics.stability_samples,
            &last_schema(&stages),
            &job.path,
        )
        .await?;
        notes.push(note);
        stages.push((Box::new(stage), OperatorMetrics::default()));
        // The summaries' own vectors, for `drift`.
        if let Some(worker) = summary_encoder {
            let stage = Embed::summaries(worker, &last_schema(&stages)).map_err(doesnt_fit)?;
            stages.push((Box::new(stage), OperatorMetrics::default()));
        }
        let settings = QualitySettings {
            stem: metrics.stem,
            thresholds: metrics.alerts,
        };
        let stage = quality_metrics(settings, &last_schema(&stages)).map_err(doesnt_fit)?;
        stages.push((Box::new(stage), OperatorMetrics::default()));
    }

    let run_dir = job
        .config
        .output
        .path
        .join(format!("{RUN_DIR_PREFIX}{run_id}"));
    let expected_rows = match options.limit {
        Some(limit) => scan.file_rows.min(limit as u64),
        None => scan.file_rows,
    };
    Ok(PreparedRun {
        _lock: lock,
        job,
        run_id,
        run_dir,
        scan,
        stages,
        index,
        notes,
        progress: Progress {
            expected_rows,
            read,
            written: OperatorMetrics::default(),
        },
    })
}

impl PreparedRun {
    /// Counters to show progress from while [`PreparedRun::execute`] runs.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// What the preparation did that the user should know (e.g. an index rebuilt).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The folder the run writes.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Runs every stage to the end, records the job and the manifest beside the output,
    /// and returns the manifest. Ctrl-C stops the run cleanly (finished files kept).
    pub async fn execute(self) -> Result<RunManifest, PipelineError> {
        let started = Instant::now();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
        };
        std::fs::create_dir_all(&self.run_dir).map_err(io(&self.run_dir))?;
        let record = self.run_dir.join(JOB_RECORD);
        std::fs::write(&record, self.job.to_toml()).map_err(io(&record))?;
        let mut manifest = RunManifest {
            run_id: self.run_id.clone(),
            job: self.job.name(),
            status: RunStatus::Running,
            abridge_version: env!("CARGO_PKG_VERSION").to_string(),
            job_file: self.job.path.display().to_string(),
            overrides: self.job.overrides.clone(),
            started_at: now_rfc3339(),
            finished_at: None,
            elapsed_s: 0.0,
            input_files: self
                .scan
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            input_files_failed: Vec::new(),
            rows_read: 0,
            rows_written: 0,
            rows_failed: 0,
            rows_filtered: 0,
            duplicates_dropped: 0,
            files: Vec::new(),
            stages: Vec::new(),
            error: None,
        };
        manifest.write(&self.run_dir).map_err(io(&self.run_dir))?;

        let capacity = self.job.config.run.channel_capacity;
        let chained = chain(self.scan.stream, &self.stages, capacity);
        let sink = ParquetSink {
            dir: self.run_dir.clone(),
            run_id: self.run_id.clone(),
            rows_per_file: self.job.config.output.rows_per_file,
            row_group_rows: self.job.config.output.row_group_rows,
        };
        let mut outcome: Result<SinkReport, Option<OperatorError>> = match chained {
            Err(err) => Err(Some(err)),
            Ok(stream) => tokio::select! {
                written = sink.write(stream, self.progress.written.clone()) => written.map_err(Some),
                _ = tokio::signal::ctrl_c() => Err(None),
            },
        };
        // The index commits after the output files are in place and before the manifest
        // says committed; its commit names the run, so a crash in between is detected
        // (and repaired) by the next run.
        if let (Ok(_), Some(index)) = (&outcome, &self.index)
            && let Err(err) = index.commit(&self.run_id)
        {
            outcome = Err(Some(err.into()));
        }

        // Counts are final here: every stage task has finished or been dropped.
        manifest.stages.push(StageSummary {
            stage: "scan".into(),
            metrics: self.progress.read.snapshot(),
        });
        for (stage, metrics) in &self.stages {
            manifest.stages.push(StageSummary {
                stage: stage.name().into(),
                metrics: metrics.snapshot(),
            });
        }
        manifest.stages.push(StageSummary {
            stage: "sink".into(),
            metrics: self.progress.written.snapshot(),
        });
        manifest.rows_read = self.progress.read.snapshot().rows_out;
        if let Ok(failed) = self.scan.failed.lock() {
            manifest.input_files_failed = failed
                .iter()
                .map(|f| InputFileFailure {
                    path: f.path.display().to_string(),
                    error: f.error.clone(),
                })
                .collect();
        }
        manifest.rows_failed = self
            .stages
            .iter()
            .map(|(_, m)| m.snapshot().rows_failed)
            .sum();
        manifest.rows_filtered = self
            .stages
            .iter()
            .map(|(_, m)| m.snapshot().rows_filtered)
            .sum();
        manifest.duplicates_dropped = self
            .stages
            .iter()
            .map(|(_, m)| m.snapshot().rows_dropped)
            .sum();
        manifest.finished_at = Some(now_rfc3339());
        manifest.elapsed_s = started.elapsed().as_secs_f64();

        let result = match outcome {
            Ok(report) => {
                manifest.status = RunStatus::Committed;
                manifest.rows_written = report.rows;
                manifest.files = report.files.iter().map(|f| file_name(f)).collect();
                Ok(())
            }
            Err(cause) => {
                manifest.status = RunStatus::Failed;
                manifest.rows_written = self.progress.written.snapshot().rows_out;
                manifest.files = finished_files(&self.run_dir);
                Err(match cause {
                    Some(source) => PipelineError::RunFailed {
                        run_id: self.run_id.clone(),
                        run_dir: self.run_dir.clone(),
                        source: Box::new(source),
                    },
                    None => PipelineError::Interrupted {
                        run_id: self.run_id.clone(),
                        run_dir: self.run_dir.clone(),
                    },
                })
            }
        };
        if let Err(err) = &result {
            manifest.error = Some(err.to_string());
        }
        manifest.write(&self.run_dir).map_err(io(&self.run_dir))?;
        result.map(|()| manifest)
    }
}

/// Wires `stages` after `input`, each driven on its own task behind a bounded channel.
fn chain(
    input: SendableRecordBatchStream,
    stages: &[(Box<dyn Operator>, OperatorMetrics)],
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

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn finished_files(run_dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(run_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| file_name(&e.path()))
                .filter(|n| n.starts_with("part-") && n.ends_with(".parquet"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Fixed-width UTC timestamps, so that they sort as text.
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}
