//! The output table as a Delta Lake table (deltalake-core): the commit protocol that is to
//! replace the folder protocol of this module's parent (issue 34; the executor does not
//! write through it yet).
//!
//! A run, or one shard of it, is one writer. Its commits are fenced by Delta's
//! application transactions (`txn` actions) instead of by a lock:
//!
//! - **claim**: a writer that starts or resumes a run commits a `txn` for the run's app id
//!   (`abridge:<run>:<shard>`) one past the table's, with no files. From then on it is
//!   the run's owner, and any earlier writer of the run is a zombie.
//! - **commit**: each commit interval is one Delta commit, the add actions of its files
//!   plus the next `txn` version. It is refused ([`DeltaOutputError::Fenced`]) when the
//!   table's version of the app id is not the writer's own: refused by this module when
//!   the table it reads already shows another owner's commit, and by Delta's conflict
//!   check when that commit lands between the read and this commit (a winning commit that
//!   touched the same app id). A refused commit adds nothing to the table: a zombie can
//!   neither double a batch nor remove one.
//!
//! Commits of different shards are blind appends, which Delta lets through concurrently.
//! On a local disk the commit's log entry and its folder are synced before the commit is
//! reported (object_store's local store does not sync), as the data files are by their
//! writer before it commits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, StructType, Transaction};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableError};
use url::Url;

/// The partition column: one folder of files per run.
pub const PARTITION: &str = "run_id";

/// Why the output table could not be opened or committed to.
#[derive(Debug, thiserror::Error)]
pub enum DeltaOutputError {
    /// The table could not be read, created or written.
    #[error("output table {location}: {source}")]
    Table {
        location: String,
        #[source]
        source: Box<DeltaTableError>,
    },
    /// A newer writer owns the run: this writer's commit was refused, and the table holds
    /// nothing of it.
    #[error(
        "output table {location}: {app_id} was taken over by another writer (the table is at \
         its commit {theirs}, this writer's last was {ours}); this writer's commit was refused \
         and added nothing"
    )]
    Fenced {
        location: String,
        app_id: String,
        ours: i64,
        theirs: i64,
    },
    /// The table's files could not be synced to the local disk.
    #[error("output table {location}: syncing {path}: {source}")]
    Sync {
        location: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An output table in Delta Lake format.
pub struct DeltaOutput {
    table: DeltaTable,
    location: String,
}

/// The writer of one run (or shard), as [`DeltaOutput::claim`] made it: its app id and the
/// `txn` version of its last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunWriter {
    pub app_id: String,
    pub version: i64,
}

/// A data file written under the table's location, to be added by a commit.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Relative to the table's location, `/`-separated (`run_id=<run>/part-….parquet`).
    pub path: String,
    pub size: i64,
    pub run_id: String,
}

/// The app id of `run_id`'s writer: one per shard, so that shards commit side by side.
pub fn app_id(run_id: &str, shard: Option<(usize, usize)>) -> String {
    match shard {
        Some((index, count)) => format!("abridge:{run_id}:{index}/{count}"),
        None => format!("abridge:{run_id}"),
    }
}

impl DeltaOutput {
    /// Opens the Delta table at `location`, or creates it with `schema` (and the
    /// partition column) where there is none yet.
    pub async fn open_or_create(
        location: &Url,
        schema: &SchemaRef,
    ) -> Result<Self, DeltaOutputError> {
        let shown = location.to_string();
        let fail = |source: DeltaTableError| DeltaOutputError::Table {
            location: shown.clone(),
            source: Box::new(source),
        };
        let table = match deltalake_core::open_table(location.clone()).await {
            Ok(table) => table,
            Err(DeltaTableError::NotATable(_)) => {
                let columns: StructType = Arc::clone(schema)
                    .try_into_kernel()
                    .map_err(|e| fail(DeltaTableError::Generic(format!("its schema: {e}"))))?;
                CreateBuilder::new()
                    .with_location(location.as_str())
                    .with_columns(columns.fields().cloned())
                    .with_partition_columns([PARTITION])
                    .with_save_mode(SaveMode::Ignore)
                    .await
                    .map_err(&fail)?
            }
            Err(e) => return Err(fail(e)),
        };
        let output = Self {
            table,
            location: shown,
        };
        if let Some(version) = output.table.version() {
            output.sync(version)?;
        }
        Ok(output)
    }

    /// The table's version as last read.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// The table's files (paths relative to its location), as last read.
    pub fn files(&self) -> Result<Vec<String>, DeltaOutputError> {
        let snapshot = self.table.snapshot().map_err(|e| self.fail(e))?;
        Ok(snapshot
            .log_data()
            .into_iter()
            .map(|file| file.path().to_string())
            .collect())
    }

    /// **claim**: makes a new writer of `app_id`'s run the owner, fencing every earlier
    /// one (a commit of the next `txn` version, without files).
    pub async fn claim(&mut self, app_id: &str) -> Result<RunWriter, DeltaOutputError> {
        self.refresh().await?;
        let current = self.txn_version(app_id).await?.unwrap_or(0);
        let mut writer = RunWriter {
            app_id: app_id.to_string(),
            version: current,
        };
        let mut metadata = HashMap::new();
        metadata.insert(
            "abridge".to_string(),
            serde_json::json!({ "claim": app_id }),
        );
        self.commit_on_read_state(&mut writer, Vec::new(), metadata)
            .await?;
        Ok(writer)
    }

    /// **commit**: adds `files` to the table in one commit of `writer`'s run, with
    /// `metadata` in its commit info. Returns the table's new version.
    pub async fn commit(
        &mut self,
        writer: &mut RunWriter,
        files: Vec<DataFile>,
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<u64, DeltaOutputError> {
        self.refresh().await?;
        self.check_owner(writer).await?;
        self.commit_on_read_state(writer, files, metadata).await
    }

    /// Refuses `writer` when the table shows another owner of its app id.
    async fn check_owner(&self, writer: &RunWriter) -> Result<(), DeltaOutputError> {
        let theirs = self.txn_version(&writer.app_id).await?.unwrap_or(0);
        if theirs == writer.version {
            return Ok(());
        }
        Err(self.fenced(writer, theirs))
    }

    /// Commits on the state last read (not refreshed first): a commit that landed since
    /// and touched the same app id makes Delta refuse this one.
    async fn commit_on_read_state(
        &mut self,
        writer: &mut RunWriter,
        files: Vec<DataFile>,
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<u64, DeltaOutputError> {
        let now = chrono::Utc::now().timestamp_millis();
        let actions: Vec<Action> = files
            .into_iter()
            .map(|file| {
                Action::Add(Add {
                    path: file.path,
                    partition_values: HashMap::from([(PARTITION.to_string(), Some(file.run_id))]),
                    size: file.size,
                    modification_time: now,
                    data_change: true,
                    ..Default::default()
                })
            })
            .collect();
        let next = writer.version + 1;
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new(&writer.app_id, next))
            .with_metadata(metadata);
        let snapshot = self.table.snapshot().map_err(|e| self.fail(e))?;
        let committed = CommitBuilder::from(properties)
            .with_actions(actions)
            .with_max_retries(3)
            .build(
                Some(snapshot),
                self.table.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: Some(vec![PARTITION.to_string()]),
                    predicate: None,
                },
            )
            .await;
        let version = match committed {
            Ok(done) => done.version(),
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_),
            }) => {
                self.refresh().await?;
                let theirs = self.txn_version(&writer.app_id).await?.unwrap_or(0);
                return Err(self.fenced(writer, theirs));
            }
            Err(e) => return Err(self.fail(e)),
        };
        self.sync(version)?;
        writer.version = next;
        self.refresh().await?;
        Ok(version)
    }

    async fn refresh(&mut self) -> Result<(), DeltaOutputError> {
        self.table.update_state().await.map_err(|e| self.fail(e))
    }

    async fn txn_version(&self, app_id: &str) -> Result<Option<i64>, DeltaOutputError> {
        let snapshot = self.table.snapshot().map_err(|e| self.fail(e))?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await
            .map_err(|e| self.fail(e))
    }

    /// On a local disk, syncs the log entry of `version` and the log's folder: a commit is
    /// durable once reported.
    fn sync(&self, version: u64) -> Result<(), DeltaOutputError> {
        let Some(root) = self.local_root() else {
            return Ok(());
        };
        let log = root.join("_delta_log");
        let entry = log.join(format!("{version:020}.json"));
        for path in [&entry, &log] {
            let synced = std::fs::File::open(path).and_then(|f| f.sync_all());
            if let Err(source) = synced {
                return Err(DeltaOutputError::Sync {
                    location: self.location.clone(),
                    path: path.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// The table's folder when it is on a local disk.
    fn local_root(&self) -> Option<PathBuf> {
        let url = self.table.table_url();
        (url.scheme() == "file")
            .then(|| url.to_file_path().ok())
            .flatten()
    }

    fn fail(&self, source: DeltaTableError) -> DeltaOutputError {
        DeltaOutputError::Table {
            location: self.location.clone(),
            source: Box::new(source),
        }
    }

    fn fenced(&self, writer: &RunWriter, theirs: i64) -> DeltaOutputError {
        DeltaOutputError::Fenced {
            location: self.location.clone(),
            app_id: writer.app_id.clone(),
            ours: writer.version,
            theirs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;

    /// The `file://` URL of a local folder (made absolute).
    fn local_url(dir: &Path) -> Result<Url, String> {
        let absolute = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Url::from_directory_path(&absolute)
            .map_err(|()| format!("{} is not a usable folder path", absolute.display()))
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(PARTITION, DataType::Utf8, false),
        ]))
    }

    /// A data file of `ids` in `run_id`'s folder under `root`, synced, as the sink writes.
    fn data_file(root: &Path, run_id: &str, name: &str, ids: &[i64]) -> DataFile {
        let relative = format!("{PARTITION}={run_id}/{name}.parquet");
        let path = root.join(&relative);
        std::fs::create_dir_all(path.parent().expect("folder")).expect("mkdir");
        let file = std::fs::File::create(&path).expect("create");
        // The partition column lives in the folder name, not in the file.
        let data = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&data),
            vec![Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef],
        )
        .expect("batch");
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, data, None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        DataFile {
            size: std::fs::metadata(&path).expect("size").len() as i64,
            path: relative,
            run_id: run_id.to_string(),
        }
    }

    async fn open(url: &Url) -> DeltaOutput {
        DeltaOutput::open_or_create(url, &schema())
            .await
            .expect("the table")
    }

    fn rows(root: &Path, files: &[String]) -> Vec<i64> {
        let mut ids = Vec::new();
        for file in files {
            let reader = std::fs::File::open(root.join(file)).expect("open");
            let batches =
                parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(reader, 64)
                    .expect("reader");
            for batch in batches {
                let batch = batch.expect("batch");
                let column = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("ids");
                ids.extend(column.values().iter().copied());
            }
        }
        ids.sort_unstable();
        ids
    }

    #[tokio::test]
    async fn a_zombie_writer_is_refused_and_nothing_is_lost_or_doubled() {
        let dir = tempfile::tempdir().expect("dir");
        let url = local_url(dir.path()).expect("url");
        let app = app_id("r1", None);
        let mut first = open(&url).await;
        let mut zombie = first.claim(&app).await.expect("claim");
        let a = data_file(dir.path(), "r1", "a", &[1, 2]);
        first
            .commit(&mut zombie, vec![a], HashMap::new())
            .await
            .expect("first batch");

        // A second writer of the same run (a resumed attempt, a duplicated pod) claims it.
        let mut second = open(&url).await;
        let mut owner = second.claim(&app).await.expect("claim");
        let b = data_file(dir.path(), "r1", "b", &[3, 4]);
        second
            .commit(&mut owner, vec![b], HashMap::new())
            .await
            .expect("owner's batch");

        // The zombie's next commit is refused, and the table holds nothing of it.
        let z = data_file(dir.path(), "r1", "z", &[3, 4, 5]);
        let err = first
            .commit(&mut zombie, vec![z], HashMap::new())
            .await
            .expect_err("fenced");
        assert!(matches!(err, DeltaOutputError::Fenced { .. }), "{err}");
        assert!(err.to_string().contains("taken over"), "{err}");
        let files = second.files().expect("files");
        assert_eq!(rows(dir.path(), &files), [1, 2, 3, 4], "{files:?}");
    }

    #[tokio::test]
    async fn a_zombie_whose_read_is_older_than_the_claim_is_refused_by_the_conflict_check() {
        let dir = tempfile::tempdir().expect("dir");
        let url = local_url(dir.path()).expect("url");
        let app = app_id("r1", Some((0, 2)));
        let mut first = open(&url).await;
        let mut zombie = first.claim(&app).await.expect("claim");
        // The zombie has read the table and checked that it still owns the run...
        first.refresh().await.expect("read");
        first.check_owner(&zombie).await.expect("still the owner");
        // ...when another writer claims it and commits.
        let mut second = open(&url).await;
        let mut owner = second.claim(&app).await.expect("claim");
        let b = data_file(dir.path(), "r1", "b", &[7]);
        second
            .commit(&mut owner, vec![b], HashMap::new())
            .await
            .expect("owner's batch");
        // Its commit on what it read conflicts with the claim: Delta refuses it.
        let z = data_file(dir.path(), "r1", "z", &[8]);
        let err = first
            .commit_on_read_state(&mut zombie, vec![z], HashMap::new())
            .await
            .expect_err("refused");
        assert!(matches!(err, DeltaOutputError::Fenced { .. }), "{err}");
        second.refresh().await.expect("read");
        assert_eq!(rows(dir.path(), &second.files().expect("files")), [7]);
    }

    #[tokio::test]
    async fn shards_commit_side_by_side_and_a_resumed_writer_continues_its_versions() {
        let dir = tempfile::tempdir().expect("dir");
        let url = local_url(dir.path()).expect("url");
        let mut tables = Vec::new();
        let mut writers = Vec::new();
        for shard in 0..3 {
            let mut table = open(&url).await;
            writers.push(
                table
                    .claim(&app_id("r2", Some((shard, 3))))
                    .await
                    .expect("claim"),
            );
            tables.push(table);
        }
        // Every shard commits at once, twice: none is refused (blind appends).
        for round in 0..2i64 {
            let commits = tables.iter_mut().zip(writers.iter_mut()).enumerate().map(
                |(shard, (table, writer))| {
                    let id = round * 10 + shard as i64;
                    let file = data_file(dir.path(), "r2", &format!("s{shard}-{round}"), &[id]);
                    table.commit(writer, vec![file], HashMap::new())
                },
            );
            for result in futures::future::join_all(commits).await {
                result.expect("a shard's commit");
            }
        }
        assert!(writers.iter().all(|w| w.version == 3), "{writers:?}");
        let mut reader = open(&url).await;
        assert_eq!(
            rows(dir.path(), &reader.files().expect("files")),
            [0, 1, 2, 10, 11, 12]
        );
        // A resumed shard goes on from the table's version of its app id.
        let resumed = reader
            .claim(&app_id("r2", Some((1, 3))))
            .await
            .expect("claim");
        assert_eq!(resumed.version, 4);
        // Every reported commit is in the log on disk.
        let log = dir.path().join("_delta_log");
        let version = reader.version().expect("version");
        assert!(log.join(format!("{version:020}.json")).is_file());
    }
}
