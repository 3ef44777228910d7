//! `abridge sql`: read-only ad-hoc SQL over output tables (and any Parquet) with DataFusion,
//! with the quality measures and, given a job, its models as functions
//! ([`model_functions`]).

pub mod model_functions;
pub mod result_cache;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abridge_operators::scan::{check_file, resolve_files};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::file_format::options::ParquetReadOptions;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection, Sort, SortExpr};
use parquet::arrow::ArrowWriter;

use crate::error::PipelineError;
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
    models: Option<SessionModels>,
    /// The results fingerprint of the latest committed run registered as `summaries`.
    latest_fingerprint: Option<String>,
}

/// The job's models as functions, and what the session knows of their answers.
struct SessionModels {
    functions: ModelFunctions,
    /// The job's results fingerprint: a committed run with the same one answers calls.
    job_fingerprint: String,
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
            models: None,
            latest_fingerprint: None,
        }
    }

    /// Registers the job's models as functions (`summarize`, `embed` and their `try_`
    /// forms); `job_fingerprint` is the job's [`crate::job::Job::results_fingerprint`].
    pub fn with_models(&mut self, functions: ModelFunctions, job_fingerprint: String) {
        for function in functions.udfs() {
            self.ctx.register_udf(function);
        }
        self.models = Some(SessionModels {
            functions,
            job_fingerprint,
            learned: false,
        });
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

    /// Registers an output table: `summaries` is its latest committed run (every committed
    /// shard of it, when it was split with `--shard`), `runs` all of its committed runs.
    /// Returns the latest run's folder, if there is one.
    pub async fn register_output(
        &mut self,
        output: &Path,
    ) -> Result<Option<PathBuf>, PipelineError> {
        let runs = committed_runs(output).map_err(|source| PipelineError::Io {
            path: output.to_path_buf(),
            source,
        })?;
        let Some((latest, newest)) = runs.last() else {
            return Ok(None);
        };
        let latest = latest.clone();
        self.latest_fingerprint = newest.fingerprint.clone();
        let group = newest.shard.as_ref().map(|s| (s.group.clone(), s.count));
        let shards: Vec<PathBuf> = runs
            .iter()
            .filter(|(_, m)| {
                let same = m.shard.as_ref().map(|s| (s.group.clone(), s.count));
                group.is_some() && same == group
            })
            .map(|(dir, _)| dir.clone())
            .collect();
        let summaries = match shards.is_empty() {
            true => vec![latest.clone()],
            false => shards,
        };
        let all: Vec<PathBuf> = runs.into_iter().map(|(dir, _)| dir).collect();
        self.register_run_dirs("summaries", &summaries).await?;
        self.register_run_dirs("runs", &all).await?;
        Ok(Some(latest))
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
        let plan = match calls_models(&plan)? {
            true => {
                let plan = sort_before_model_calls(plan)?;
                let plan = group_and_sort_by_model_calls(plan)?;
                self.prepare_model_calls(&plan).await?;
                plan
            }
            false => plan,
        };
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.map_err(placement_error);
        // What the models answered is kept even when the query then fails.
        if let Some(models) = &self.models {
            models.functions.persist()?;
        }
        Ok((schema, batches?))
    }

    /// Before a query calls models: the committed run's answers are learned (once), and
    /// the query runs once without calling any, counting the inputs it would send; more
    /// than the limit refuses it.
    async fn prepare_model_calls(&mut self, plan: &LogicalPlan) -> Result<(), PipelineError> {
        let Some(models) = &mut self.models else {
            return Ok(());
        };
        let committed = self.registered.iter().any(|t| t == "summaries")
            && self.latest_fingerprint.as_ref() == Some(&models.job_fingerprint);
        if !models.learned && committed && models.functions.caching() {
            models.learned = true;
            let rows = self.ctx.table("summaries").await?.collect().await?;
            models.functions.learn_committed(&rows);
        }
        let max = models.functions.max_model_rows();
        if max == 0 {
            return Ok(());
        }
        models.functions.begin_count();
        let counted = match self.ctx.execute_logical_plan(plan.clone()).await {
            Ok(df) => df.collect().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let rows = models.functions.end_count();
        counted.map_err(placement_error)?;
        if rows > max {
            return Err(PipelineError::TooManyModelRows { rows, max });
        }
        Ok(())
    }
}

/// DataFusion runs async functions (the model functions) in projections, filters and
/// aggregate arguments, and abridge moves those that group or sort into a projection
/// ([`group_and_sort_by_model_calls`]); elsewhere (grouping sets, ROLLUP, CUBE) it fails
/// with an internal error, which is the user's to work around.
fn placement_error(e: datafusion::error::DataFusionError) -> PipelineError {
    match e
        .to_string()
        .contains("async functions should not be called directly")
    {
        true => PipelineError::Query(
            "a model function (summarize, embed, classify, extract_fields) cannot be computed \
             here (GROUPING SETS, ROLLUP or CUBE): make it a column of a subquery and group \
             by that column, e.g. SELECT c, count(*) FROM (SELECT classify(text, ['a', 'b']) \
             AS c FROM summaries) GROUP BY ROLLUP (c)"
                .into(),
        ),
        false => e.into(),
    }
}

/// Whether `plan` calls one of the model functions anywhere (subqueries included).
fn calls_models(plan: &LogicalPlan) -> Result<bool, PipelineError> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            found |= calls_model(expr);
            Ok(match found {
                true => TreeNodeRecursion::Stop,
                false => TreeNodeRecursion::Continue,
            })
        })
    })?;
    Ok(found)
}

/// Whether `expr` calls one of the model functions.
fn calls_model(expr: &Expr) -> bool {
    expr.exists(|e| {
        Ok(matches!(e, Expr::ScalarFunction(f) if model_functions::NAMES.contains(&f.name())))
    })
    .unwrap_or(true)
}

/// Sorts before the model calls that a sort does not depend on. SQL plans `SELECT id,
/// summarize(text) FROM t ORDER BY id LIMIT 4` as a sort over the projection that calls
/// the model, so every row would be summarized before four are kept; sorting the
/// projection's input by the same keys and projecting after gives the same rows in the
/// same order, and the optimizer then pushes the `LIMIT` into the sort, so that four rows
/// reach the model.
fn sort_before_model_calls(plan: LogicalPlan) -> Result<LogicalPlan, PipelineError> {
    let rewritten = plan.transform_up(|node| {
        let LogicalPlan::Sort(sort) = &node else {
            return Ok(Transformed::no(node));
        };
        let LogicalPlan::Projection(projection) = sort.input.as_ref() else {
            return Ok(Transformed::no(node));
        };
        if !projection.expr.iter().any(calls_model) {
            return Ok(Transformed::no(node));
        }
        // The sort keys in terms of the projection's input.
        let outputs: HashMap<Column, Expr> = projection
            .schema
            .columns()
            .into_iter()
            .zip(projection.expr.iter().map(|e| e.clone().unalias()))
            .collect();
        let mut keys: Vec<SortExpr> = Vec::with_capacity(sort.expr.len());
        for key in &sort.expr {
            let expr = key.expr.clone().transform(|e| match &e {
                Expr::Column(c) => match outputs.get(c) {
                    Some(source) => Ok(Transformed::yes(source.clone())),
                    None => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })?;
            if calls_model(&expr.data) {
                return Ok(Transformed::no(node));
            }
            keys.push(key.with_expr(expr.data));
        }
        let sorted = LogicalPlan::Sort(Sort {
            expr: keys,
            input: Arc::clone(&projection.input),
            fetch: sort.fetch,
        });
        let projected = Projection::try_new(projection.expr.clone(), Arc::new(sorted))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projected)))
    })?;
    Ok(rewritten.data)
}

/// Computes the model calls that a `GROUP BY` groups by, or an `ORDER BY` sorts by, in a
/// projection under the aggregate or sort, which then uses their columns: DataFusion
/// evaluates async functions (the model functions) in projections, not in grouping or
/// sort expressions. Groups keep their names, and a sort is followed by a projection of
/// its input's columns, so the plan above is unchanged.
fn group_and_sort_by_model_calls(plan: LogicalPlan) -> Result<LogicalPlan, PipelineError> {
    let rewritten = plan.transform_up(|node| match &node {
        LogicalPlan::Aggregate(aggregate) => {
            let grouping_sets = aggregate
                .group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)));
            if grouping_sets || !aggregate.group_expr.iter().any(calls_model) {
                return Ok(Transformed::no(node));
            }
            let (below, groups) = computed_below(&aggregate.input, &aggregate.group_expr)?;
            let groups = groups
                .into_iter()
                .zip(&aggregate.group_expr)
                .map(|(new, old)| match new == *old {
                    true => new,
                    false => new.alias(old.schema_name().to_string()),
                })
                .collect();
            let grouped = Aggregate::try_new(below, groups, aggregate.aggr_expr.clone())?;
            Ok(Transformed::yes(LogicalPlan::Aggregate(grouped)))
        }
        LogicalPlan::Sort(sort) if sort.expr.iter().any(|k| calls_model(&k.expr)) => {
            let keys: Vec<Expr> = sort.expr.iter().map(|k| k.expr.clone()).collect();
            let (below, keys) = computed_below(&sort.input, &keys)?;
            let keys = sort
                .expr
                .iter()
                .zip(keys)
                .map(|(old, new)| old.with_expr(new))
                .collect();
            let sorted = LogicalPlan::Sort(Sort {
                expr: keys,
                input: below,
                fetch: sort.fetch,
            });
            let columns = sort.input.schema().columns().into_iter().map(Expr::Column);
            let projected = Projection::try_new(columns.collect(), Arc::new(sorted))?;
            Ok(Transformed::yes(LogicalPlan::Projection(projected)))
        }
        _ => Ok(Transformed::no(node)),
    })?;
    Ok(rewritten.data)
}

/// `input` with a column for each of `exprs` that calls a model, and `exprs` with those
/// calls replaced by their columns.
fn computed_below(
    input: &Arc<LogicalPlan>,
    exprs: &[Expr],
) -> datafusion::error::Result<(Arc<LogicalPlan>, Vec<Expr>)> {
    let mut below: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let mut replaced = Vec::with_capacity(exprs.len());
    for (i, expr) in exprs.iter().enumerate() {
        if !calls_model(expr) {
            replaced.push(expr.clone());
            continue;
        }
        let column = format!("__abridge_model_{i}");
        below.push(expr.clone().alias(&column));
        replaced.push(Expr::Column(Column::new_unqualified(column)));
    }
    let below = Projection::try_new(below, Arc::clone(input))?;
    Ok((Arc::new(LogicalPlan::Projection(below)), replaced))
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
