//! `abridge sql`: read-only ad-hoc SQL over output tables (and any Parquet) with DataFusion,
//! with the quality measures and, given a job, its models as functions
//! ([`model_functions`]).

pub mod model_functions;
mod plan;

use plan::{
    calls_models, counting_plan, group_and_sort_by_model_calls, lift_nested_model_calls,
    placement_error, sort_before_model_calls,
};
pub mod result_cache;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abridge_operators::scan::{check_file, check_whole_file, guarded, resolve_files};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use datafusion::datasource::file_format::options::ParquetReadOptions;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::logical_expr::LogicalPlan;
use parquet::arrow::ArrowWriter;

use crate::error::PipelineError;
use crate::job::Job;
use crate::table::manifest::committed_runs;
use model_functions::{ModelAccounting, ModelFunctions};

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array with one object per row.
    Json,
    /// A Parquet file (needs `--out`).
    Parquet,
}

/// A query session with abridge's tables registered.
pub struct SqlSession {
    ctx: SessionContext,
    registered: Vec<String>,
    /// Every Parquet file the registered tables read.
    files: Vec<PathBuf>,
    models: Option<SessionModels>,
    /// The results fingerprint of the latest committed run registered as `summaries`.
    latest_fingerprint: Option<String>,
}

/// The job's models as functions, and what the session knows of their answers.
struct SessionModels {
    functions: ModelFunctions,
    /// The job: a committed run with its results fingerprint answers calls (worked out on
    /// the first model call: it reads every byte of the models).
    job: Job,
    /// Whether the committed run's answers were read (once, on the first model call).
    learned: bool,
}

impl Default for SqlSession {
    fn default() -> Self {
        Self::new()
    }
}

impl SqlSession {
    /// A session with no tables, and abridge's measures as functions (`rouge_n`,
    /// `rouge_l`, `cosine`, `compression`; see `abridge_operators::quality::functions`).
    pub fn new() -> Self {
        Self::with_context(SessionContext::new())
    }

    /// A session whose queries run on `threads` threads: `threads` partitions, and as
    /// many threads for the measures' row-parallel scoring (the global pool, so once per
    /// process).
    pub fn with_threads(threads: usize) -> Self {
        let threads = threads.max(1);
        // Fails only when the pool was already built (a second session): it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("abridge-sql-{i}"))
            .build_global();
        let config = datafusion::prelude::SessionConfig::new().with_target_partitions(threads);
        Self::with_context(SessionContext::new_with_config(config))
    }

    fn with_context(ctx: SessionContext) -> Self {
        for function in abridge_operators::quality::functions::all() {
            ctx.register_udf(function);
        }
        Self {
            ctx,
            registered: Vec::new(),
            files: Vec::new(),
            models: None,
            latest_fingerprint: None,
        }
    }

    /// Registers the job's models as functions (`summarize`, `embed` and their `try_`
    /// forms).
    pub fn with_models(&mut self, functions: ModelFunctions, job: Job) {
        for function in functions.udfs() {
            self.ctx.register_udf(function);
        }
        self.models = Some(SessionModels {
            functions,
            job,
            learned: false,
        });
    }

    /// Writes the answers not yet kept to the cache and logs the session's model use:
    /// after a query, also one that failed or was interrupted.
    pub fn keep_answers(&self) -> Result<usize, PipelineError> {
        let Some(models) = &self.models else {
            return Ok(0);
        };
        models.functions.log_query();
        models.functions.persist()
    }

    /// What the model functions did so far (None without a job's models).
    pub fn model_accounting(&self) -> Option<ModelAccounting> {
        self.models.as_ref().map(|m| m.functions.accounting())
    }

    /// Registers the Parquet data at `path` (a file, a folder or a glob) as `name`.
    pub async fn register_path(&mut self, name: &str, path: &str) -> Result<(), PipelineError> {
        let files = resolve_files(path)
            .map_err(|e| PipelineError::Usage(format!("--table {name}: {e}")))?;
        self.register_files(name, &files).await
    }

    /// Registers an output table: `summaries` is its latest complete committed run, `runs`
    /// all of its committed runs. A run split with `--shard` is complete once every shard
    /// has committed: a newer group still missing shards is left out of `summaries`, with
    /// a note on stderr naming it, unless `run_group` names it (then `summaries` is that
    /// group's committed shards). Returns the run folders `summaries` reads.
    pub async fn register_output(
        &mut self,
        output: &Path,
        run_group: Option<&str>,
    ) -> Result<Vec<PathBuf>, PipelineError> {
        let runs = committed_runs(output).map_err(|source| PipelineError::Io {
            path: output.to_path_buf(),
            source,
        })?;
        let group_of = |i: usize| {
            runs[i]
                .1
                .shard
                .as_ref()
                .map(|s| (s.group.as_str(), s.count))
        };
        let members = |group: (&str, u32)| -> Vec<usize> {
            (0..runs.len())
                .filter(|&i| group_of(i) == Some(group))
                .collect()
        };
        let chosen: Vec<usize> = match run_group {
            Some(name) => {
                let found: Vec<usize> = (0..runs.len())
                    .filter(|&i| group_of(i).is_some_and(|(g, _)| g == name))
                    .collect();
                if found.is_empty() {
                    return Err(PipelineError::Usage(format!(
                        "--run-group {name}: {} has no committed shard of that group",
                        output.display()
                    )));
                }
                found
            }
            None => {
                let mut chosen = Vec::new();
                let mut passed: Vec<(&str, u32)> = Vec::new();
                for i in (0..runs.len()).rev() {
                    let Some(group) = group_of(i) else {
                        chosen = vec![i];
                        break;
                    };
                    if passed.contains(&group) {
                        continue;
                    }
                    let shards = members(group);
                    let mut done: Vec<u32> = shards
                        .iter()
                        .filter_map(|&m| runs[m].1.shard.as_ref().map(|s| s.index))
                        .collect();
                    done.sort_unstable();
                    done.dedup();
                    if done.len() as u32 >= group.1 {
                        chosen = shards;
                        break;
                    }
                    tracing::warn!(
                        "shard group {}: {} of {} shards committed; `summaries` is the latest \
                         complete run until the others have (--run-group {} reads it as it is)",
                        group.0,
                        done.len(),
                        group.1,
                        group.0
                    );
                    passed.push(group);
                }
                chosen
            }
        };
        let summaries: Vec<PathBuf> = chosen.iter().map(|&i| runs[i].0.clone()).collect();
        self.latest_fingerprint = chosen.last().and_then(|&i| runs[i].1.fingerprint.clone());
        let all: Vec<PathBuf> = runs.iter().map(|(dir, _)| dir.clone()).collect();
        if !summaries.is_empty() {
            self.register_run_dirs("summaries", &summaries).await?;
        }
        if !all.is_empty() {
            self.register_run_dirs("runs", &all).await?;
        }
        Ok(summaries)
    }

    /// Registers the data files of the run folders `dirs` as one table `name`.
    pub async fn register_run_dirs(
        &mut self,
        name: &str,
        dirs: &[PathBuf],
    ) -> Result<(), PipelineError> {
        let mut files = Vec::new();
        for dir in dirs {
            files.extend(
                resolve_files(&dir.display().to_string())
                    .map_err(|e| PipelineError::Usage(e.to_string()))?,
            );
        }
        self.register_files(name, &files).await
    }

    /// Registers record batches already in memory as table `name`.
    pub fn register_batches(
        &mut self,
        name: &str,
        batches: &[RecordBatch],
    ) -> Result<(), PipelineError> {
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => Arc::new(arrow::datatypes::Schema::empty()),
        };
        let table = datafusion::datasource::MemTable::try_new(schema, vec![batches.to_vec()])?;
        self.ctx.register_table(name, Arc::new(table))?;
        self.registered.push(name.to_string());
        Ok(())
    }

    /// The column names of registered table `name`.
    pub async fn columns(&self, name: &str) -> Result<Vec<String>, PipelineError> {
        let table = self.ctx.table(name).await?;
        Ok(table
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect())
    }

    async fn register_files(&mut self, name: &str, files: &[PathBuf]) -> Result<(), PipelineError> {
        // Footers first, guarded: DataFusion panics on some corrupt ones, and its errors
        // name no file.
        for file in files {
            check_file(file).map_err(|e| PipelineError::Usage(format!("table {name}: {e}")))?;
        }
        let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        // Every file's columns, not the first file's: runs made before a stage existed
        // lack its columns, which then read as null there.
        let schema = merged_schema(name, files)?;
        let options = ParquetReadOptions {
            file_extension: "",
            schema: schema.as_ref(),
            ..Default::default()
        };
        let df =
            self.ctx.read_parquet(paths, options).await.map_err(|e| {
                PipelineError::Usage(format!("table {name}: {}", e.strip_backtrace()))
            })?;
        self.ctx.register_table(name, df.into_view())?;
        self.registered.push(name.to_string());
        self.files.extend(files.iter().cloned());
        Ok(())
    }

    /// Names of the registered tables.
    pub fn tables(&self) -> &[String] {
        &self.registered
    }

    /// Runs one read-only statement: anything that would create, change or write data
    /// (DDL, DML, COPY, SET ...) is refused before it runs.
    pub async fn query(
        &mut self,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), PipelineError> {
        // A statement that does not plan (syntax, unknown table or column) is the user's
        // to fix; failures while it runs (a file that breaks mid-read) are not.
        let plan = self
            .ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(|e| PipelineError::Query(e.strip_backtrace()))?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| PipelineError::ReadOnly(e.strip_backtrace()))?;
        if !calls_models(&plan)? {
            return self.run(plan).await;
        }
        let plan = sort_before_model_calls(plan)?;
        let plan = group_and_sort_by_model_calls(plan)?;
        let plan = lift_nested_model_calls(plan)?;
        match self.prepare_model_calls(&plan).await? {
            Some(answered) => Ok(answered),
            None => {
                let result = self.run(plan).await;
                // What the models answered is kept even when the query then fails.
                if let Some(models) = &self.models {
                    models.functions.persist()?;
                }
                result
            }
        }
    }

    async fn run(&self, plan: LogicalPlan) -> Result<(SchemaRef, Vec<RecordBatch>), PipelineError> {
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = guarded(df.collect())
            .await
            .map_err(|e| self.reading_error(e))?;
        Ok((schema, batches))
    }

    /// A query's failure, naming the file when it came from reading one: DataFusion's
    /// errors (and the reader's panics) do not say which, so on a reading failure each
    /// file the tables read is read whole until one fails.
    fn reading_error(&self, e: datafusion::error::DataFusionError) -> PipelineError {
        let text = e.to_string();
        if !["Parquet", "parquet", "Arrow error", "IO error"]
            .iter()
            .any(|s| text.contains(s))
        {
            return placement_error(e);
        }
        self.files
            .iter()
            .find_map(|file| check_whole_file(file).err())
            .map_or_else(
                || placement_error(e),
                |bad| PipelineError::UnreadableFile(Box::new(bad)),
            )
    }

    /// Before a query calls models: the committed run's answers are learned (once), and,
    /// under `--max-model-rows`, the query runs once calling none, counting the inputs it
    /// would send ([`plan::counting_plan`]); more than the limit refuses it. When nothing
    /// was left to call and the counting plan was the query's own, its rows are the
    /// answer, and the query does not run again.
    async fn prepare_model_calls(
        &mut self,
        plan: &LogicalPlan,
    ) -> Result<Option<(SchemaRef, Vec<RecordBatch>)>, PipelineError> {
        let Some(models) = &mut self.models else {
            return Ok(None);
        };
        let committed = self.registered.iter().any(|t| t == "summaries");
        if !models.learned && committed && models.functions.caching() {
            models.learned = true;
            if let Some(latest) = &self.latest_fingerprint
                && *latest == models.job.results_fingerprint()?
            {
                let table = self.ctx.table("summaries").await?;
                let needed = models
                    .functions
                    .committed_columns(table.schema().as_arrow());
                let needed: Vec<&str> = needed.iter().map(String::as_str).collect();
                let rows = table.select_columns(&needed)?.collect().await?;
                models.functions.learn_committed(&rows);
            }
        }
        let max = models.functions.max_model_rows();
        if max == 0 {
            return Ok(None);
        }
        let (counting, own) = counting_plan(plan.clone())?;
        models.functions.begin_count();
        let counted = self.run(counting).await;
        let Some(models) = &self.models else {
            return Ok(None);
        };
        let rows = models.functions.end_count();
        let counted = counted?;
        if rows > max {
            return Err(PipelineError::TooManyModelRows { rows, max });
        }
        Ok((rows == 0 && own && models.functions.count_answered()).then_some(counted))
    }
}

/// The union of the files' columns (None for a single file), or which files disagree on
/// a column's type.
fn merged_schema(
    name: &str,
    files: &[PathBuf],
) -> Result<Option<arrow::datatypes::Schema>, PipelineError> {
    if files.len() < 2 {
        return Ok(None);
    }
    let mut schemas = Vec::with_capacity(files.len());
    for file in files {
        let open = std::fs::File::open(file).map_err(|source| PipelineError::Io {
            path: file.clone(),
            source,
        })?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open)
            .map_err(|e| PipelineError::Usage(format!("{}: {e}", file.display())))?;
        // Field order and types decide; file-level metadata may differ between versions.
        schemas.push(arrow::datatypes::Schema::new(
            reader.schema().fields().clone(),
        ));
    }
    arrow::datatypes::Schema::try_merge(schemas)
        .map(Some)
        .map_err(|e| {
            PipelineError::Usage(format!(
                "table {name}: its files disagree on a column's type ({e})"
            ))
        })
}

/// Writes `batches` in `format` to `out`.
pub fn write_results(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: OutputFormat,
    mut out: impl Write + Send,
) -> Result<(), PipelineError> {
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches_with_schema(
                Arc::clone(schema),
                batches,
            )?;
            writeln!(out, "{table}").map_err(arrow::error::ArrowError::from)?;
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            if batches.is_empty() {
                writer.write(&RecordBatch::new_empty(Arc::clone(schema)))?;
            }
            for batch in batches {
                writer.write(batch)?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            writeln!(writer.into_inner()).map_err(arrow::error::ArrowError::from)?;
        }
        OutputFormat::Parquet => {
            let mut writer = ArrowWriter::try_new(out, Arc::clone(schema), None)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.close()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn write_table(dir: &Path) -> Result<String, PipelineError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c"])),
                Arc::new(Int64Array::from(vec![1, 2, 3])),
            ],
        )?;
        let path = dir.join("t.parquet");
        let file = std::fs::File::create(&path).map_err(|source| PipelineError::Io {
            path: path.clone(),
            source,
        })?;
        let mut writer = ArrowWriter::try_new(file, schema, None)?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(path.display().to_string())
    }

    #[tokio::test]
    async fn files_with_more_columns_than_the_first_read_in_full() -> Result<(), PipelineError> {
        let dir = tempfile::tempdir().map_err(|source| PipelineError::Io {
            path: PathBuf::from("tempdir"),
            source,
        })?;
        let old = write_table(dir.path())?;
        // A later file with one more column (a run made after a stage was added).
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new("drift", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["d"])),
                Arc::new(Int64Array::from(vec![4])),
                Arc::new(arrow::array::Float64Array::from(vec![0.5])),
            ],
        )?;
        let newer = dir.path().join("u.parquet");
        let file = std::fs::File::create(&newer).map_err(|source| PipelineError::Io {
            path: newer.clone(),
            source,
        })?;
        let mut writer = ArrowWriter::try_new(file, schema, None)?;
        writer.write(&batch)?;
        writer.close()?;
        let mut session = SqlSession::new();
        session
            .register_run_dirs("t", &[PathBuf::from(&old), newer])
            .await?;
        let (_, batches) = session
            .query("SELECT count(*) AS rows, count(drift) AS with_drift FROM t")
            .await?;
        let text = arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        assert!(text.contains("| 4    | 1          |"), "{text}");
        Ok(())
    }

    #[tokio::test]
    async fn queries_and_refuses_writes() -> Result<(), PipelineError> {
        let dir = tempfile::tempdir().map_err(|source| PipelineError::Io {
            path: "tmp".into(),
            source,
        })?;
        let path = write_table(dir.path())?;
        let mut session = SqlSession::new();
        session.register_path("t", &path).await?;
        let (_, batches) = session
            .query("SELECT sum(n) AS s FROM t WHERE id <> 'a'")
            .await?;
        let mut json = Vec::new();
        write_results(
            &batches[0].schema(),
            &batches,
            OutputFormat::Json,
            &mut json,
        )?;
        assert_eq!(String::from_utf8_lossy(&json).trim(), r#"[{"s":5}]"#);

        let target = dir.path().join("copy.parquet").display().to_string();
        for statement in [
            "CREATE TABLE x AS SELECT 1".to_string(),
            format!("COPY t TO '{target}'"),
            "INSERT INTO t VALUES ('d', 4)".to_string(),
            "DROP VIEW t".to_string(),
            "SET datafusion.execution.batch_size = 1".to_string(),
        ] {
            match session.query(&statement).await {
                Err(PipelineError::ReadOnly(_)) => {}
                other => panic!(
                    "{statement}: expected a read-only refusal, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
        assert!(!Path::new(&target).exists());
        let (_, batches) = session.query("SELECT count(*) AS c FROM t").await?;
        let mut csv = Vec::new();
        write_results(&batches[0].schema(), &batches, OutputFormat::Csv, &mut csv)?;
        assert_eq!(String::from_utf8_lossy(&csv), "c\n3\n");
        Ok(())
    }

    #[tokio::test]
    async fn empty_results_still_print_their_columns() -> Result<(), PipelineError> {
        let dir = tempfile::tempdir().map_err(|source| PipelineError::Io {
            path: "tmp".into(),
            source,
        })?;
        let mut session = SqlSession::new();
        session
            .register_path("t", &write_table(dir.path())?)
            .await?;
        let (schema, batches) = session.query("SELECT id FROM t WHERE n > 10").await?;
        let mut text = Vec::new();
        write_results(&schema, &batches, OutputFormat::Table, &mut text)?;
        assert!(String::from_utf8_lossy(&text).contains("| id |"));
        let mut json = Vec::new();
        write_results(&schema, &batches, OutputFormat::Json, &mut json)?;
        assert_eq!(String::from_utf8_lossy(&json).trim(), "[]");
        Ok(())
    }
}
