//! End-to-end tests: the real `abridge` binary on real Parquet files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use abridge_models::encoder::Encoder;
use abridge_models::models::bert::BertEncoder;
use abridge_pipeline::job::Job;
use abridge_pipeline::table::lock::{LOCK_FILE, OutputLock};
use abridge_pipeline::table::manifest::{RunManifest, RunStatus};
use arrow::array::{Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn abridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_abridge"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("the abridge binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A job file in `dir` over `input`, mapped like the demo, writing to `dir/out`.
fn job_file(dir: &Path, input: &Path, extra: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[input]
path = "{}"
[input.columns]
id = "ticket_id"
title = "subject"
text = "body"
created_at = "opened_at"
reference = "resolution_summary"
[output]
path = "{}"
{extra}
"#,
            input.display(),
            dir.join("out").display()
        ),
    )?;
    Ok(path)
}

fn sample(dir: &Path, name: &str, rows: usize, seed: u64) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let out = abridge(&[
        "sample",
        "--rows",
        &rows.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        path.to_str().unwrap_or_default(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(path)
}

fn run_json(job: &Path, extra: &[&str]) -> Result<RunManifest, Box<dyn std::error::Error>> {
    let mut args = vec!["run", job.to_str().unwrap_or_default(), "--json"];
    args.extend_from_slice(extra);
    let out = abridge(&args);
    assert!(out.status.success(), "abridge run failed: {}", stderr(&out));
    Ok(serde_json::from_str(&stdout(&out))?)
}

fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, Box<dyn std::error::Error>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?.build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

fn sql(job: &Path, query: &str, format: &str) -> Output {
    abridge(&[
        "sql",
        query,
        "--job",
        job.to_str().unwrap_or_default(),
        "--format",
        format,
    ])
}

/// `jobs/demo.toml` itself, as shipped (only its output and index sent to a temporary
/// folder): every stage runs, kept tickets get summaries and metrics, the index answers
/// a search.
#[test]
fn the_shipped_demo_job_runs_end_to_end() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (out_dir, index) = (dir.path().join("out"), dir.path().join("index"));
    let m = run_json(
        &repo().join("jobs/demo.toml"),
        &[
            "--set",
            &format!("output.path={}", out_dir.display()),
            "--set",
            &format!("index.path={}", index.display()),
        ],
    )?;
    assert_eq!((m.status, m.rows_read), (RunStatus::Committed, 400));
    let stages: Vec<&str> = m.stages.iter().map(|s| s.stage.as_str()).collect();
    for stage in ["embed", "filter", "summarize", "metrics"] {
        assert!(
            stages.iter().any(|s| s.contains(stage)),
            "{stage} in {stages:?}"
        );
    }
    let table = format!(
        "t={}",
        out_dir.join(format!("run_id={}", m.run_id)).display()
    );
    let out = abridge(&[
        "sql",
        "SELECT count(*) FILTER (WHERE kept AND error IS NULL) AS summarized, \
         count(*) FILTER (WHERE kept AND error IS NULL AND (summary IS NULL OR summary = '')) \
           AS without_summary, \
         count(*) FILTER (WHERE kept AND error IS NULL AND (rouge_l IS NULL OR drift IS NULL \
           OR stability IS NULL)) AS without_metrics \
         FROM t",
        "--table",
        &table,
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let counts: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert!(
        counts[0]["summarized"].as_u64().is_some_and(|n| n > 0),
        "{counts}"
    );
    assert_eq!(counts[0]["without_summary"], 0, "{counts}");
    assert_eq!(counts[0]["without_metrics"], 0, "{counts}");
    let out = abridge(&[
        "search",
        "printer offline",
        "--index",
        index.to_str().unwrap_or_default(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hits: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert!(hits.as_array().is_some_and(|h| !h.is_empty()), "{hits}");
    Ok(())
}

#[test]
fn demo_job_writes_a_run_that_sql_reads() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = repo().join("jobs/data/demo-tickets.parquet");
    let job = job_file(dir.path(), &input, "")?;
    let m = run_json(&job, &[])?;
    assert_eq!(m.status, RunStatus::Committed);
    assert_eq!(m.rows_read, 400);
    assert!(m.duplicates_dropped > 0, "the sample re-sends some tickets");
    assert!(m.rows_failed > 0, "the sample has some empty bodies");
    assert_eq!(
        m.rows_written + m.duplicates_dropped,
        m.rows_read,
        "rows conserved"
    );

    let run_dir = dir.path().join("out").join(format!("run_id={}", m.run_id));
    assert!(run_dir.join("_job.toml").exists());
    let recorded = Job::load(&run_dir.join("_job.toml"), &[])?;
    assert_eq!(recorded.config.input.columns.text.as_deref(), Some("body"));
    assert_eq!(RunManifest::read(&run_dir)?, m);

    let out = sql(
        &job,
        "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(error) AS errors, \
         min(run_id) AS run FROM summaries",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert_eq!(rows[0]["n"], m.rows_written);
    assert_eq!(
        rows[0]["ids"], m.rows_written,
        "no duplicate ids in the output"
    );
    assert_eq!(rows[0]["errors"], m.rows_failed);
    assert_eq!(rows[0]["run"], m.run_id.as_str());

    // Schema names, carried columns and per-row reasons.
    let out = sql(
        &job,
        "SELECT DISTINCT error FROM summaries WHERE error IS NOT NULL ORDER BY error",
        "csv",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("text is empty"), "{}", stdout(&out));
    let out = sql(
        &job,
        "SELECT id, title, text, created_at, reference, topic, content_hash, category, language \
         FROM summaries WHERE error IS NULL LIMIT 1",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert!(
        row[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("INC"))
    );
    assert_eq!(row[0]["content_hash"].as_str().map(str::len), Some(32));
    Ok(())
}

#[test]
fn second_run_becomes_summaries_and_both_are_in_runs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 120, 3)?;
    let job = job_file(dir.path(), &input, "")?;
    let first = run_json(&job, &[])?;
    let second = run_json(&job, &["--limit", "50"])?;
    assert!(second.run_id > first.run_id);
    let out = sql(&job, "SELECT count(*) AS n FROM summaries", "csv");
    assert_eq!(stdout(&out), format!("n\n{}\n", second.rows_written));
    let out = sql(
        &job,
        "SELECT count(DISTINCT run_id) AS r, count(*) AS n FROM runs",
        "csv",
    );
    assert_eq!(
        stdout(&out),
        format!("r,n\n2,{}\n", first.rows_written + second.rows_written)
    );
    Ok(())
}

#[test]
fn json_logs_are_one_object_per_line_with_the_runs_fields() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 40, 3)?;
    let job = job_file(dir.path(), &input, "")?;
    let events = |out: &Output| -> Result<Vec<serde_json::Value>, serde_json::Error> {
        stderr(out).lines().map(serde_json::from_str).collect()
    };
    let job_path = job.to_str().unwrap_or_default();
    let out = abridge(&["run", job_path, "--log-format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let logged = events(&out)?;
    let started = logged
        .iter()
        .find(|e| e["dir"].is_string())
        .ok_or("no run-started event")?;
    let run_id = started["run_id"].as_str().ok_or("run_id")?;
    let committed = logged
        .iter()
        .find(|e| e["rows_written"].is_u64())
        .ok_or("no run-committed event")?;
    assert_eq!(committed["run_id"], run_id);
    assert_eq!(committed["rows_written"], 40);
    assert_eq!(committed["level"], "INFO");
    assert!(committed["timestamp"].is_string(), "{committed}");

    // An error is an event too, with the exit code a scheduler sees.
    let out = abridge(&["run", "/no/such/job.toml", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let logged = events(&out)?;
    assert_eq!(logged.len(), 1, "{}", stderr(&out));
    assert_eq!(logged[0]["level"], "ERROR");
    assert_eq!(logged[0]["exit_code"], 2);
    assert!(
        logged[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/no/such/job.toml")),
        "{}",
        logged[0]
    );
    // Text, the default, writes the same error for people.
    let out = abridge(&["run", "/no/such/job.toml"]);
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
    Ok(())
}

#[test]
fn where_is_pushed_down_and_limit_and_overrides_apply() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 600, 11)?;
    let job = job_file(dir.path(), &input, "")?;
    let m = run_json(
        &job,
        &["--set", "input.where=language = 'zh' AND priority = 'P1'"],
    )?;
    assert!(m.rows_read > 0 && m.rows_read < 200, "{}", m.rows_read);
    let out = sql(
        &job,
        "SELECT count(*) AS n FROM summaries WHERE language <> 'zh' OR priority <> 'P1'",
        "csv",
    );
    assert_eq!(stdout(&out), "n\n0\n");

    let elsewhere = dir.path().join("elsewhere");
    let m = run_json(
        &job,
        &[
            "--limit",
            "25",
            "--set",
            &format!("output.path={}", elsewhere.display()),
        ],
    )?;
    assert_eq!(m.rows_read, 25);
    assert!(
        elsewhere
            .join(format!("run_id={}", m.run_id))
            .join("_run.json")
            .exists()
    );
    Ok(())
}

#[test]
fn folder_and_glob_inputs_read_every_file_and_roll_output_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("2026-11"))?;
    sample(&data, "a.parquet", 100, 1)?;
    sample(&data.join("2026-11"), "b.parquet", 150, 2)?;
    std::fs::write(data.join("_SUCCESS"), "")?;
    let job = job_file(dir.path(), &data, "rows_per_file = 60")?;
    let m = run_json(
        &job,
        &[
            "--set",
            "input.columns.id=subject",
            "--set",
            "input.columns.title=ticket_id",
        ],
    )?;
    assert_eq!(m.rows_read, 250);
    assert_eq!(m.input_files.len(), 2);
    assert_eq!(m.files.len() as u64, m.rows_written.div_ceil(60));

    let glob = format!("{}/*.parquet", data.display());
    let m = run_json(&job, &["--set", &format!("input.path={glob}")])?;
    assert_eq!(m.rows_read, 100);
    Ok(())
}

#[test]
fn bad_job_files_are_named_with_exit_code_2() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = repo().join("jobs/data/demo-tickets.parquet");
    let cases: &[(&str, &[&str], &str)] = &[
        ("[run]\nbatchsize = 3", &[], "run.batchsize"),
        ("[run]\nbatch_size = \"many\"", &[], "run.batch_size"),
        (
            "",
            &["--set", "input.columns.txt=body"],
            "input.columns.txt",
        ),
        ("", &["--set", "novalue"], "key=value"),
        (
            "",
            &["--set", "input.columns.text=no_such_column"],
            "no_such_column",
        ),
        ("", &["--set", "input.columns.text=opened_at"], "opened_at"),
        (
            "",
            &["--set", "input.where=no_such_column > 3"],
            "no_such_column",
        ),
        ("", &["--set", "input.where=status = "], "input.where"),
    ];
    for (extra, flags, needle) in cases {
        let job = job_file(dir.path(), &input, extra)?;
        let mut args = vec!["run", job.to_str().unwrap_or_default()];
        args.extend_from_slice(flags);
        let out = abridge(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !dir.path().join("out").exists(),
            "nothing is written for a bad job"
        );
    }
    let out = abridge(&["run", "/no/such/job.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/no/such/job.toml"));
    let out = abridge(&["run"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    Ok(())
}

#[test]
fn missing_and_corrupt_inputs_are_named_with_exit_code_1() -> TestResult {
    let dir = tempfile::tempdir()?;
    let good = sample(dir.path(), "good.parquet", 200, 5)?;
    let bytes = std::fs::read(&good)?;
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let not_parquet = dir.path().join("notes.parquet");
    std::fs::write(&not_parquet, "ticket_id,body\n1,hello\n")?;
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir_all(&empty_dir)?;
    let cases = [
        (dir.path().join("missing.parquet"), "missing.parquet"),
        (truncated, "truncated.parquet"),
        (not_parquet, "notes.parquet"),
        (empty_dir, "no Parquet files"),
    ];
    for (input, needle) in cases {
        let job = job_file(dir.path(), &input, "")?;
        let out = abridge(&["run", job.to_str().unwrap_or_default()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", input.display());
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    Ok(())
}

/// In `abridge sql` too, a file whose pages are garbage (footer intact) fails the query
/// by name, without a panic.
#[test]
fn sql_names_a_file_with_corrupt_pages() -> TestResult {
    let dir = tempfile::tempdir()?;
    sample(dir.path(), "good.parquet", 2000, 1)?;
    let bad = sample(dir.path(), "bad.parquet", 2000, 2)?;
    let mut bytes = std::fs::read(&bad)?;
    let end = bytes.len() * 2 / 3;
    for b in &mut bytes[64..end] {
        *b = 0xA5;
    }
    std::fs::write(&bad, bytes)?;
    let tables = [
        format!("g={}", dir.path().join("good.parquet").display()),
        format!("b={}", bad.display()),
    ];
    let out = abridge(&[
        "sql",
        "SELECT count(*), max(body) FROM (SELECT body FROM g UNION ALL SELECT body FROM b)",
        "--table",
        &tables[0],
        "--table",
        &tables[1],
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.parquet") && !err.contains("good.parquet"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

/// A file whose footer is intact but whose pages are garbage fails mid-stream: it is
/// skipped and named, the other files' rows are committed, and the exit code (3) says that
/// the run is complete but for that file.
#[test]
fn an_unreadable_file_is_skipped_by_name_and_the_others_are_committed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    sample(&data, "1-good.parquet", 3000, 1)?;
    let bad = sample(&data, "2-bad.parquet", 3000, 2)?;
    sample(&data, "3-good.parquet", 1000, 3)?;
    let mut bytes = std::fs::read(&bad)?;
    let end = bytes.len() * 2 / 3;
    for b in &mut bytes[64..end] {
        *b = 0xA5;
    }
    std::fs::write(&bad, bytes)?;
    let job = job_file(
        dir.path(),
        &data,
        "rows_per_file = 500\nrow_group_rows = 100\n[run]\nbatch_size = 100",
    )?;
    let out = abridge(&["run", job.to_str().unwrap_or_default()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("committed, but 1 input file(s) could not be read")
            && err.contains("2-bad.parquet"),
        "the failing file is named: {err}"
    );

    let runs: Vec<_> = std::fs::read_dir(dir.path().join("out"))?.collect::<Result<_, _>>()?;
    assert_eq!(runs.len(), 1);
    let run_dir = runs[0].path();
    let manifest = RunManifest::read(&run_dir)?;
    assert_eq!(manifest.status, RunStatus::Committed);
    assert_eq!(manifest.input_files_failed.len(), 1);
    assert!(
        manifest.input_files_failed[0]
            .path
            .ends_with("2-bad.parquet")
    );
    for entry in std::fs::read_dir(&run_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".inprogress"),
            "partial file left behind: {name}"
        );
    }
    let mut rows = 0;
    for file in &manifest.files {
        rows += read_parquet(&run_dir.join(file))?
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>();
    }
    assert_eq!(rows as u64, manifest.rows_written);
    assert_eq!(
        manifest.rows_read,
        manifest.rows_written + manifest.duplicates_dropped,
        "every row read is written or counted as a duplicate"
    );
    assert!(
        manifest.rows_read >= 4000,
        "every row of the good files was read: {}",
        manifest.rows_read
    );

    // The committed run is what `summaries` shows.
    let out = sql(&job, "SELECT count(*) AS n FROM summaries", "csv");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(&rows.to_string()), "{}", stdout(&out));
    Ok(())
}

/// Two live runs of one output refuse each other; a lock left by a dead run is cleared.
#[test]
fn a_live_run_holds_the_output_and_a_dead_ones_lock_is_cleared() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 50, 1)?;
    let job = job_file(dir.path(), &input, "")?;
    let out_dir = dir.path().join("out");
    let (held, _) = OutputLock::acquire(&out_dir, "nightly-1", None)?;
    let out = abridge(&["run", job.to_str().unwrap_or_default()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("nightly-1") && err.contains(LOCK_FILE),
        "names the holder and the lock: {err}"
    );
    assert!(
        std::fs::read_dir(&out_dir)?.count() == 1,
        "nothing written but the lock"
    );
    drop(held);
    assert!(
        !out_dir.exists(),
        "the folder the lock made is gone with it"
    );

    // A holder that no longer runs: its lock is stale.
    std::fs::create_dir_all(&out_dir)?;
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    std::fs::write(
        out_dir.join(LOCK_FILE),
        format!(
            r#"{{"pid": {dead}, "start_ticks": 1, "host": "{}", "run_id": "crashed-run", "since": "x"}}"#,
            std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim()
        ),
    )?;
    let out = abridge(&["run", job.to_str().unwrap_or_default()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stale lock of run crashed-run"), "{err}");
    assert!(!out_dir.join(LOCK_FILE).exists(), "released at the end");
    Ok(())
}

#[test]
fn sql_is_read_only_and_writes_every_format() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = repo().join("jobs/data/demo-tickets.parquet");
    let table = format!("t={}", input.display());
    let copy = dir.path().join("copy.parquet");
    for statement in [
        "CREATE TABLE x AS SELECT 1".to_string(),
        format!("COPY t TO '{}'", copy.display()),
        "INSERT INTO t SELECT * FROM t".to_string(),
    ] {
        let out = abridge(&["sql", &statement, "--table", &table]);
        assert_eq!(out.status.code(), Some(2), "{statement}: {}", stderr(&out));
        assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    }
    assert!(!copy.exists());

    let query = "SELECT category, count(*) AS n FROM t GROUP BY category ORDER BY category";
    let out = abridge(&["sql", query, "--table", &table]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("| category"), "{}", stdout(&out));
    assert!(stdout(&out).contains("| printing"), "{}", stdout(&out));

    let parquet_out = dir.path().join("r.parquet");
    let out = abridge(&["sql", query, "--table", &table, "--format", "parquet"]);
    assert_eq!(out.status.code(), Some(2), "parquet needs --out");
    let out = abridge(&[
        "sql",
        query,
        "--table",
        &table,
        "--format",
        "parquet",
        "--out",
        parquet_out.to_str().unwrap_or_default(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let batches = read_parquet(&parquet_out)?;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 8);

    // A mistake in the query is the user's to fix: exit 2.
    for query in [
        "SELECT * FROM nowhere",
        "SELECT no_such_column FROM t",
        "SELEC 1",
    ] {
        let out = abridge(&["sql", query, "--table", &table]);
        assert_eq!(out.status.code(), Some(2), "{query}: {}", stderr(&out));
        assert!(stderr(&out).contains("SQL: "), "{}", stderr(&out));
    }
    // A broken file is named, its error said once.
    let broken = dir.path().join("broken.parquet");
    std::fs::write(&broken, b"PAR1 not really parquet PAR1")?;
    let out = abridge(&[
        "sql",
        "SELECT 1",
        "--table",
        &format!("b={}", broken.display()),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&broken.display().to_string())
            && !err.contains("Parquet error: Parquet error"),
        "{err}"
    );
    let out = abridge(&["sql", "SELECT 1", "--table", "t=/no/such.parquet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/no/such.parquet"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn sample_is_deterministic_and_the_bundled_sample_is_its_output() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = read_parquet(&sample(dir.path(), "a.parquet", 400, 5)?)?;
    let b = read_parquet(&sample(dir.path(), "b.parquet", 400, 5)?)?;
    let bundled = read_parquet(&repo().join("jobs/data/demo-tickets.parquet"))?;
    let concat = |batches: &[RecordBatch]| {
        arrow::compute::concat_batches(&batches[0].schema(), batches).expect("same schema")
    };
    assert_eq!(concat(&a), concat(&b));
    assert_eq!(
        concat(&a),
        concat(&bundled),
        "regenerate with: abridge sample --rows 400 --seed 5 --out jobs/data/demo-tickets.parquet"
    );
    let c = concat(&read_parquet(&sample(dir.path(), "c.parquet", 400, 6)?)?);
    let body = |b: &RecordBatch| {
        b.column_by_name("body")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .map(|c| {
                (0..c.len())
                    .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
    };
    assert_ne!(body(&concat(&a)), body(&c));
    Ok(())
}

#[test]
fn every_shipped_job_parses() -> TestResult {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("jobs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            Job::load(&path, &[]).map_err(|e| format!("{}: {e}", path.display()))?;
            seen += 1;
        }
    }
    assert!(seen >= 2);
    Ok(())
}

/// The binary `cargo build` makes (this one: the tests build it without the `failpoints`
/// feature) has no failpoints: `FAILPOINTS` that would abort a run changes nothing.
#[test]
fn failpoints_are_not_in_the_binary_a_user_builds() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 20, 1)?;
    let job = job_file(dir.path(), &input, "")?;
    let out = Command::new(env!("CARGO_BIN_EXE_abridge"))
        .args(["run", job.to_str().unwrap_or_default(), "--json"])
        .env("FAILPOINTS", "sink::write=return;sink::publish=return")
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: RunManifest = serde_json::from_str(&stdout(&out))?;
    assert_eq!(manifest.rows_written, 20);
    Ok(())
}

#[test]
fn help_teaches_each_command() {
    for command in ["run", "sql", "search", "eval", "sample", "status"] {
        let out = abridge(&[command, "--help"]);
        assert!(out.status.success());
        assert!(
            stdout(&out).contains("Example"),
            "{command} --help has examples"
        );
    }
    // What a scheduler needs: the exit codes, in `abridge --help` and `abridge run --help`.
    for args in [&["--help"][..], &["run", "--help"]] {
        let help = stdout(&abridge(args));
        for code in ["75 ", "130 ", "143 "] {
            assert!(
                help.contains(code),
                "{args:?} names exit code {code}: {help}"
            );
        }
    }
}

#[test]
fn embed_stage_writes_normalized_vectors_of_the_model_dimension() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = repo().join("jobs/data/demo-tickets.parquet");
    let model = abridge_models::cached_model_dir("minilm-l6-v2");
    let job = job_file(
        dir.path(),
        &input,
        &format!(
            "[embed]\nmodel = \"{}\"\ninput = \"{{title}}\\n{{text}}\"\n",
            model.display()
        ),
    )?;
    let m = run_json(&job, &["--limit", "60"])?;
    assert_eq!(m.status, RunStatus::Committed);
    assert!(
        m.stages
            .iter()
            .any(|s| s.stage == "embed" && s.metrics.rows_out == m.rows_written)
    );
    let out = sql(
        &job,
        "SELECT count(embedding) AS embedded, count(*) - count(error) AS ok, \
         min(array_length(embedding)) AS dim FROM summaries",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    assert_eq!(
        row[0]["embedded"], row[0]["ok"],
        "every row without an error is embedded"
    );
    assert_eq!(row[0]["dim"], 384);

    // A model folder that is not a model: a clear error naming it, nothing written.
    let bad = dir.path().join("not-a-model");
    std::fs::create_dir_all(&bad)?;
    let out = abridge(&[
        "run",
        job.to_str().unwrap_or_default(),
        "--set",
        &format!("embed.model={}", bad.display()),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not-a-model") && stderr(&out).contains("config.json"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// `[embed]`, `[filter]` and `[index]` sections over the small test model, with the index
/// in `dir/index`.
fn retrieval_sections(dir: &Path) -> String {
    let model = abridge_models::cached_model_dir("minilm-l6-v2");
    format!(
        r#"
[embed]
model = "{}"
input = "{{title}}\n{{text}}"
[filter.similarity]
queries = ["a device or service is down and the employee cannot work"]
threshold = 0.1
[filter.topics]
allowed = ["printing", "network", "other"]
min_score = 0.15
[filter.topics.labels]
printing = ["printer offline, print jobs stuck in the queue"]
network = ["VPN, wifi or internet connection drops"]
billing = ["invoice, refund, payment charged twice"]
[index]
path = "{}"
"#,
        model.display(),
        dir.join("index").display()
    )
}

fn search(args: &[&str]) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let mut all = vec!["search"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let out = abridge(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(serde_json::from_str(&stdout(&out))?)
}

/// Lower-cased words (and CJK characters) of a text.
fn words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The default threshold is decided per query from the encoder's cosine to unrelated
/// text: with MiniLM (unrelated ~0.03) a little above 0.375, different per query, and
/// every kept ticket reaches its query's.
#[test]
fn relative_thresholds_are_decided_per_query_and_kept_tickets_reach_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 80, 4)?;
    let sections = retrieval_sections(dir.path())
        .replace(
            "queries = [\"a device or service is down and the employee cannot work\"]",
            "queries = [\"printer offline\", \"the VPN connection keeps dropping when working from home\"]",
        )
        .replace("threshold = 0.1", "threshold = { above_unrelated = 0.375 }");
    let job = job_file(dir.path(), &input, &sections)?;
    let m = run_json(&job, &[])?;
    let thresholds: Vec<f32> = m.queries.iter().map(|q| q.threshold).collect();
    assert_eq!(thresholds.len(), 2);
    assert!(
        thresholds.iter().all(|t| (0.35..0.5).contains(t)),
        "{thresholds:?}"
    );
    assert!(
        (thresholds[0] - thresholds[1]).abs() > 1e-4,
        "{thresholds:?}"
    );
    let out = sql(
        &job,
        "SELECT matched_query AS q, min(similarity) AS least, count(*) AS kept FROM summaries \
         WHERE kept GROUP BY matched_query",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    assert!(!rows.is_empty(), "some ticket is kept");
    for row in rows {
        let query = m.queries.iter().find(|q| row["q"] == q.query.as_str());
        let query = query.ok_or_else(|| format!("{row} matched no query of the run"))?;
        assert!(row["least"].as_f64().unwrap_or(0.0) >= f64::from(query.threshold) - 1e-6);
        assert_eq!(row["kept"].as_u64(), Some(query.kept));
    }
    Ok(())
}

/// `[filter.topics] match = "query"`: of the tickets near a query, only those of that
/// query's topic are kept; the others say why.
#[test]
fn match_query_keeps_only_tickets_of_their_querys_topic() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 120, 4)?;
    let sections = retrieval_sections(dir.path())
        .replace(
            "queries = [\"a device or service is down and the employee cannot work\"]",
            "queries = [\"printer offline\", \"the VPN connection keeps dropping\"]",
        )
        .replace(
            "allowed = [\"printing\", \"network\", \"other\"]",
            "match = \"query\"",
        );
    let job = job_file(dir.path(), &input, &sections)?;
    run_json(&job, &[])?;
    let loose = run_json(&job, &["--set", "filter.topics.match=\"allowed\""])?;
    let rows = |query: &str| -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
        let out = sql(&job, query, "json");
        assert!(out.status.success(), "{}", stderr(&out));
        Ok(serde_json::from_str(&stdout(&out))?)
    };
    // Kept tickets of a query share its topic: one topic per query, and not the same one.
    let kept = rows(
        "SELECT matched_query, count(DISTINCT topic) AS topics, min(topic) AS topic FROM runs \
         WHERE kept AND run_id <> (SELECT max(run_id) FROM runs) GROUP BY matched_query",
    )?;
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.iter().all(|r| r["topics"] == 1), "{kept:?}");
    assert_ne!(kept[0]["topic"], kept[1]["topic"], "{kept:?}");
    // Tickets near a query but of another (allowed) topic are dropped with that reason
    // alone; the run with `match = "allowed"` kept exactly them besides.
    let dropped = rows(
        "SELECT count(*) AS n FROM runs WHERE run_id <> (SELECT max(run_id) FROM runs) AND \
         filter_reason LIKE '%the topic of matched query%' AND filter_reason NOT LIKE '%;%'",
    )?;
    let n = dropped[0]["n"].as_u64().unwrap_or(0);
    assert!(n > 0, "no ticket of another topic matched a query");
    let first_kept = rows(
        "SELECT count(*) AS n FROM runs WHERE kept AND run_id <> (SELECT max(run_id) FROM runs)",
    )?;
    let loose_kept = loose.stages.iter().find(|s| s.stage == "filter");
    let loose_filtered = loose_kept.map(|s| s.metrics.rows_filtered).unwrap_or(0);
    let strict_kept = first_kept[0]["n"].as_u64().unwrap_or(0);
    assert_eq!(
        strict_kept + n,
        loose.rows_read - loose_filtered - loose.rows_failed,
        "{loose:?}"
    );

    // Without similarity queries there is nothing to match: refused by key.
    let no_queries = sections.replace(
        "[filter.similarity]\nqueries = [\"printer offline\", \"the VPN connection keeps dropping\"]\nthreshold = 0.1\n",
        "",
    );
    let job = job_file(dir.path(), &input, &no_queries)?;
    let out = abridge(&["run", job.to_str().unwrap_or_default()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("filter.topics.match"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// `[filter.topics] method = "classifier"` and `[extract]`, by the summarizer model
/// (SmolLM2 on abridge's engine: a weak classifier, whose choices the assertions take as
/// they come). Topics are always labels, decided only for tickets the similarity rule
/// kept, and `match = "query"` compares them with each query's topic as the run decided
/// it; kept tickets are summarized and get a struct of the named fields, the others
/// neither.
#[test]
fn classifier_topics_are_labels_matched_to_their_query_and_kept_tickets_are_extracted() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 80, 4)?;
    let smollm2 = abridge_models::cached_model_dir("smollm2-135m-instruct");
    let sections = retrieval_sections(dir.path())
        .replace(
            "queries = [\"a device or service is down and the employee cannot work\"]",
            "queries = [\"printer offline\", \"the VPN connection keeps dropping\"]",
        )
        .replace(
            "allowed = [\"printing\", \"network\", \"other\"]",
            "method = \"classifier\"\nmatch = \"query\"\nallowed = [\"billing\", \"printing\"]",
        )
        + &format!(
            "[summarize]\nbackend = \"llama\"\nmodel = \"{}\"\nmax_new_tokens = 6\n\
             temperature = 0.0\n[extract]\nfields = [\"device\", \"place\"]\n",
            smollm2.display()
        );
    let job = job_file(dir.path(), &input, &sections)?;
    let out = abridge(&["run", job.to_str().unwrap_or_default(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run: RunManifest = serde_json::from_str(&stdout(&out))?;
    let topics_stage = run.stages.iter().find(|s| s.stage == "topics");
    assert!(
        topics_stage.is_some_and(|s| s.metrics.rows_failed == 0),
        "{run:?}"
    );
    // Each query's topic, from the run's notes.
    let notes = stderr(&out);
    let query_topic: std::collections::HashMap<String, String> = notes
        .lines()
        .filter_map(|l| {
            l.split_once("topics: the query ")?
                .1
                .split_once(" is of topic ")
        })
        .map(|(q, t)| {
            (
                q.trim_matches('"').to_string(),
                t.trim_matches('"').to_string(),
            )
        })
        .collect();
    assert_eq!(query_topic.len(), 2, "{notes}");
    let rows = |query: &str| -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
        let out = sql(&job, query, "json");
        assert!(out.status.success(), "{}", stderr(&out));
        Ok(serde_json::from_str(&stdout(&out))?)
    };
    let labels = ["printing", "network", "billing"];
    let all = rows(
        "SELECT matched_query, topic, topic_score, kept, filter_reason, summary, \
         extracted IS NOT NULL AS filled, extracted['device'] AS device, extract_error \
         FROM summaries",
    )?;
    let mut classified = 0;
    for r in &all {
        assert!(r["topic_score"].is_null(), "{r}");
        let Some(query) = r["matched_query"].as_str() else {
            assert!(r["topic"].is_null(), "not classified: {r}");
            assert_eq!(r["filled"], false, "{r}");
            continue;
        };
        classified += 1;
        let topic = r["topic"].as_str().unwrap_or_default();
        assert!(labels.contains(&topic), "{r}");
        let same = query_topic.get(query).is_some_and(|t| t == topic);
        let allowed = topic != "network";
        assert_eq!(r["kept"].as_bool(), Some(same && allowed), "{r}");
        let reason = r["filter_reason"].as_str().unwrap_or_default();
        assert_eq!(reason.contains("the topic of matched query"), !same, "{r}");
        assert_eq!(reason.contains("not allowed"), !allowed, "{r}");
        // Kept tickets are summarized and their forms filled in (abridge's engine writes
        // each `name:`, the model the value); the others have neither.
        let filled = r["filled"].as_bool() == Some(true) && r["extract_error"].is_null();
        assert_eq!(filled, same && allowed, "{r}");
        assert_eq!(r["summary"].is_string(), same && allowed, "{r}");
    }
    assert!(
        classified > 0 && classified < all.len(),
        "{classified} of {}",
        all.len()
    );
    // (SmolLM2-135M answers billing, listed first, for nearly every ticket and query.)
    assert!(all.iter().any(|r| r["kept"] == true), "no ticket kept");

    // What the classifier needs is checked by key before anything runs.
    let refusals = [
        (
            sections.replace("backend = \"llama\"", "backend = \"mistralrs\""),
            "filter.topics.method",
        ),
        (
            sections.replace("\"billing\", \"printing\"]", "\"printing\", \"other\"]"),
            "filter.topics.allowed",
        ),
        (
            sections.replace(
                "fields = [\"device\", \"place\"]",
                "fields = [\"a\", \"a\"]",
            ),
            "extract.fields",
        ),
        (
            sections.replace("[extract]\n", "[extract]\nmax_value_tokens = 0\n"),
            "extract.max_value_tokens",
        ),
        (
            sections[..sections.find("[summarize]").unwrap_or(0)].to_string(),
            "filter.topics.method",
        ),
        (
            retrieval_sections(dir.path()) + "[extract]\nfields = [\"device\"]\n",
            "add a [summarize] section",
        ),
    ];
    for (sections, key) in refusals {
        let job = job_file(dir.path(), &input, &sections)?;
        let out = abridge(&["run", job.to_str().unwrap_or_default()]);
        assert_eq!(out.status.code(), Some(2), "{key}: {}", stderr(&out));
        assert!(stderr(&out).contains(key), "{key}: {}", stderr(&out));
    }
    Ok(())
}

#[test]
fn filter_marks_rows_and_index_search_finds_by_meaning() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = repo().join("jobs/data/demo-tickets.parquet");
    let job = job_file(dir.path(), &input, &retrieval_sections(dir.path()))?;
    let m = run_json(&job, &[])?;
    assert_eq!(m.status, RunStatus::Committed);
    assert!(m.rows_filtered > 0, "some tickets are filtered out");

    // Every row is written; kept + filtered + failed = written, and SQL sees the same.
    let out = sql(
        &job,
        "SELECT count(*) FILTER (WHERE kept) AS kept, \
         count(*) FILTER (WHERE NOT kept AND error IS NULL) AS filtered, \
         count(*) FILTER (WHERE error IS NOT NULL) AS failed, \
         count(*) FILTER (WHERE NOT kept AND error IS NULL AND filter_reason IS NULL) AS unexplained, \
         count(*) FILTER (WHERE kept AND topic NOT IN ('printing', 'network', 'other')) AS leaked, \
         count(*) AS n FROM summaries",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    let n = |k: &str| row[0][k].as_u64().unwrap_or(u64::MAX);
    assert!(n("kept") > 0);
    assert_eq!(n("filtered"), m.rows_filtered);
    assert_eq!(n("failed"), m.rows_failed);
    assert_eq!(n("kept") + n("filtered") + n("failed"), n("n"));
    assert_eq!(n("unexplained"), 0, "every filtered row says why");
    // The run reports what each query kept (one query here: every kept ticket is its).
    assert_eq!(m.queries.len(), 1);
    assert_eq!(m.queries[0].kept, n("kept"));
    assert!((m.queries[0].threshold - 0.1).abs() < 1e-6);
    assert_eq!(n("leaked"), 0, "kept rows have an allowed topic");

    // Topics found by meaning agree with the sample's own categories for English tickets.
    let out = sql(
        &job,
        "SELECT count(*) FILTER (WHERE topic = category) AS agree, count(*) AS n FROM summaries \
         WHERE language = 'en' AND category IN ('printing', 'network', 'billing') AND error IS NULL",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    let (agree, total) = (row[0]["agree"].as_f64(), row[0]["n"].as_f64());
    let share = agree.unwrap_or(0.0) / total.unwrap_or(1.0);
    assert!(
        share > 0.9,
        "topic agrees with category for {share:.2} of tickets"
    );

    // A query with no word in common with its target still finds it first, by meaning.
    let query = "spooler hangs, pages pending indefinitely";
    let index = dir.path().join("index");
    let hits = search(&[
        query,
        "--index",
        index.to_str().unwrap_or_default(),
        "--mode",
        "vector",
        "--k",
        "3",
    ])?;
    let top = &hits[0];
    let target = format!(
        "{} {}",
        top["title"].as_str().unwrap_or_default(),
        top["text"].as_str().unwrap_or_default()
    );
    assert!(
        target.contains("Print jobs stay in the queue"),
        "top hit: {target}"
    );
    assert!(
        words(query).is_disjoint(&words(&target)),
        "the query shares no word with {target}"
    );
    // BM25 cannot find it: no word in common.
    let lexical = search(&[
        query,
        "--index",
        index.to_str().unwrap_or_default(),
        "--mode",
        "bm25",
    ])?;
    assert!(
        lexical
            .as_array()
            .is_none_or(|h| h.iter().all(|h| h["id"] != top["id"]))
    );

    // Chinese queries, through the job.
    let hits = search(&[
        "打印机离线",
        "--job",
        job.to_str().unwrap_or_default(),
        "--mode",
        "bm25",
        "--k",
        "5",
    ])?;
    let hits = hits.as_array().cloned().unwrap_or_default();
    assert_eq!(hits.len(), 5);
    assert!(
        hits.iter()
            .all(|h| h["text"].as_str().is_some_and(|t| t.contains("打印机")))
    );
    let hybrid = search(&["打印机离线", "--job", job.to_str().unwrap_or_default()])?;
    assert_eq!(hybrid.as_array().map(Vec::len), Some(10));

    // Re-running re-indexes the same tickets: replaced, not duplicated.
    let index_docs = |dir: &Path| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(abridge_operators::index::TicketIndex::open(dir)?.num_docs()?)
    };
    let first = index_docs(&index)?;
    assert_eq!(
        first,
        m.rows_written - m.rows_failed,
        "every ticket with a vector"
    );
    let again = run_json(&job, &[])?;
    assert_eq!(index_docs(&index)?, first);
    let newest = search(&[
        "printer",
        "--index",
        index.to_str().unwrap_or_default(),
        "--mode",
        "bm25",
        "--k",
        "1",
    ])?;
    assert_eq!(newest[0]["run_id"], again.run_id.as_str());

    // Another encoder of the same dimension (a copy of the model with one weight changed)
    // is refused by name, by search and by a run into the same index.
    let other = dir.path().join("other-encoder");
    let model = abridge_models::cached_model_dir("minilm-l6-v2");
    for sub in ["", "1_Pooling"] {
        std::fs::create_dir_all(other.join(sub))?;
        for entry in std::fs::read_dir(model.join(sub))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), other.join(sub).join(entry.file_name()))?;
            }
        }
    }
    let weights = other.join("model.safetensors");
    let mut bytes = std::fs::read(&weights)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes)?;
    let other_job = dir.path().join("other.toml");
    std::fs::write(
        &other_job,
        std::fs::read_to_string(&job)?.replace(
            &format!("model = \"{}\"", model.display()),
            &format!("model = \"{}\"", other.display()),
        ),
    )?;
    for args in [
        vec![
            "search",
            "printer",
            "--job",
            other_job.to_str().unwrap_or_default(),
        ],
        vec!["run", other_job.to_str().unwrap_or_default()],
    ] {
        let out = abridge(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("another encoder") && err.contains("other-encoder"),
            "{args:?}: {err}"
        );
    }
    Ok(())
}

#[test]
fn index_is_repaired_after_a_crash_between_its_commit_and_the_runs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 60, 3)?;
    let job = job_file(dir.path(), &input, &retrieval_sections(dir.path()))?;
    let first = run_json(&job, &[])?;
    // The second run's index commit lands, then "the machine dies" before its manifest
    // says committed: simulated by marking the run failed after the fact.
    let second = run_json(&job, &["--set", "input.where=priority = 'P1'"])?;
    let run_dir = dir
        .path()
        .join("out")
        .join(format!("run_id={}", second.run_id));
    let mut manifest = RunManifest::read(&run_dir)?;
    manifest.status = RunStatus::Failed;
    manifest.write(&run_dir)?;

    let out = abridge(&["run", job.to_str().unwrap_or_default(), "--limit", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("brought in step") && err.contains("did not finish"),
        "{err}"
    );
    let index = abridge_operators::index::TicketIndex::open(&dir.path().join("index"))?;
    assert_eq!(
        index.num_docs()?,
        first.rows_written - first.rows_failed,
        "the index holds the committed runs' tickets, once each"
    );
    Ok(())
}

#[test]
fn retrieval_config_errors_are_clear() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "t.parquet", 20, 3)?;
    let job = job_file(dir.path(), &input, &retrieval_sections(dir.path()))?;
    let job_arg = job.to_str().unwrap_or_default();

    let out = abridge(&["run", job_arg, "--set", "filter.similarity.queries=[]"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("filter.similarity.queries"),
        "{}",
        stderr(&out)
    );

    let out = abridge(&[
        "run",
        job_arg,
        "--set",
        "filter.topics.allowed=[\"hardwre\"]",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("hardwre"), "{}", stderr(&out));

    // A query whose threshold no cosine can reach is refused by name, even when the
    // job's other queries are fine.
    let out = abridge(&[
        "run",
        job_arg,
        "--set",
        "filter.similarity.queries=[\"printer\", \"the printer on the second floor is offline and every job waits\"]",
        "--set",
        "filter.similarity.threshold={ base = 0.5, per_token = 0.05 }",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("above 1") && err.contains("every job waits") && !err.contains("\"printer\""),
        "{err}"
    );

    // An index held by another writer.
    let model = abridge_models::cached_model_dir("minilm-l6-v2");
    let encoder = BertEncoder::load(&model, &candle_core::Device::Cpu, 1)?;
    let index = abridge_operators::index::TicketIndex::open_or_create(
        &dir.path().join("index"),
        384,
        &model,
        encoder.fingerprint(),
    )?;
    let held = index.writer()?;
    let out = abridge(&["run", job_arg]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("locked"), "{}", stderr(&out));
    drop(held);

    // Search without an index, or with no such folder.
    let out = abridge(&[
        "search",
        "x",
        "--index",
        dir.path().join("nope").to_str().unwrap_or_default(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no index at"), "{}", stderr(&out));
    Ok(())
}

/// Writes tickets (`id`, `title`, `text`) to a Parquet file.
fn write_tickets(path: &Path, rows: &[(&str, &str, Option<&str>)]) -> TestResult {
    use std::sync::Arc;
    let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let titles: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let texts: Vec<Option<&str>> = rows.iter().map(|r| r.2).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(StringArray::from(ids)) as Arc<dyn Array>),
        ("title", Arc::new(StringArray::from(titles))),
        ("text", Arc::new(StringArray::from(texts))),
    ])?;
    write_batch(path, &batch)
}

fn write_batch(path: &Path, batch: &RecordBatch) -> TestResult {
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), None)?;
    writer.write(batch)?;
    writer.close()?;
    Ok(())
}

/// A job over `input` (already in abridge's column names) with a `[summarize]` section on
/// the small test model, SmolLM2-135M-Instruct (GGUF).
fn summarize_job(dir: &Path, input: &Path, settings: &str) -> std::io::Result<PathBuf> {
    let model = abridge_models::cached_model_dir("smollm2-135m-instruct");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n\
             [summarize]\nmodel = \"{}\"\nmax_new_tokens = 24\n{settings}\n",
            input.display(),
            dir.join("out").display(),
            model.display()
        ),
    )?;
    Ok(path)
}

fn run_rows(job: &Path, run_id: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let out = sql(
        job,
        &format!(
            "SELECT id, summary, error, model, prompt_version, prompt_tokens, \
             completion_tokens, latency_ms, glossary_missed FROM runs WHERE run_id = '{run_id}'"
        ),
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(serde_json::from_str(&stdout(&out))?)
}

#[test]
#[cfg_attr(
    not(feature = "mistralrs"),
    ignore = "needs the mistralrs feature (on by default)"
)]
fn summarize_writes_repeatable_summaries_in_order_with_per_row_errors() -> TestResult {
    summaries_in_order_with_per_row_errors("mistralrs")
}

/// The same through abridge's own batch engine (`backend = "llama"`) on the same GGUF.
#[test]
fn llama_backend_writes_repeatable_summaries_in_order_with_per_row_errors() -> TestResult {
    summaries_in_order_with_per_row_errors("llama")
}

fn summaries_in_order_with_per_row_errors(backend: &str) -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("tickets.parquet");
    let long = "word ".repeat(9000);
    let tickets = [
        (
            "T1",
            "VPN drops",
            Some("The VPN drops every ten minutes when I work from home. Please fix the VPN."),
        ),
        (
            "T2",
            "Printer offline",
            Some("The printer on floor 3 is offline and print jobs are stuck in the queue."),
        ),
        ("T3", "Empty", None),
        ("T4", "Too long", Some(long.as_str())),
        (
            "T5",
            "邮箱已满",
            Some("我的邮箱已满，无法接收新邮件，请帮忙扩容。"),
        ),
    ];
    write_tickets(&input, &tickets)?;
    let settings = format!(
        "backend = \"{backend}\"\ntemperature = 0.8\nseed = 7\nmax_input_tokens = 20000\n\
         in_flight = 3\nglossary = [\"VPN\"]\n\
         rules = [{{ pattern = '(?i)^summary:\\s*', replace = '' }}]\n"
    );
    let job = summarize_job(dir.path(), &input, &settings)?;
    let first = run_json(&job, &[])?;
    assert_eq!(first.status, RunStatus::Committed);
    assert_eq!(first.rows_failed, 2, "the empty and the too-long ticket");
    let summarize = first.stages.iter().find(|s| s.stage == "summarize");
    assert_eq!(summarize.map(|s| s.metrics.rows_failed), Some(1));

    // Rows leave in input order, whatever order the engine answers in.
    let run_dir = dir
        .path()
        .join("out")
        .join(format!("run_id={}", first.run_id));
    let file = std::fs::read_dir(&run_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .ok_or("no output file")?;
    let batches = read_parquet(&file)?;
    let ids: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name("id").expect("id column");
            let c = c.as_any().downcast_ref::<StringArray>().expect("text ids");
            (0..c.len())
                .map(|i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, ["T1", "T2", "T3", "T4", "T5"]);

    let rows = run_rows(&job, &first.run_id)?;
    let row = |id: &str| {
        rows.as_array()
            .and_then(|r| r.iter().find(|r| r["id"] == id))
            .cloned()
            .unwrap_or_default()
    };
    for id in ["T1", "T2", "T5"] {
        let r = row(id);
        let summary = r["summary"].as_str().unwrap_or_default();
        assert!(!summary.is_empty(), "{id}: {r}");
        assert!(
            !summary.to_lowercase().starts_with("summary:"),
            "rule applied: {summary}"
        );
        assert!(r["error"].is_null(), "{id}: {r}");
        assert!(r["prompt_tokens"].as_u64().unwrap_or(0) > 10, "{r}");
        let completion = r["completion_tokens"].as_u64().unwrap_or(0);
        assert!((1..=24).contains(&completion), "{r}");
        assert!(r["latency_ms"].as_u64().is_some(), "{r}");
        assert_eq!(r["prompt_version"].as_str().map(str::len), Some(16));
        assert!(r["model"].as_str().is_some_and(|m| m.contains("smollm2")));
        assert!(r["glossary_missed"].is_array(), "{r}");
    }
    // VPN is missed only if the summary lost it.
    let t1 = row("T1");
    let kept_vpn = t1["summary"].as_str().unwrap_or_default().contains("VPN");
    assert_eq!(
        t1["glossary_missed"].as_array().map(Vec::is_empty),
        Some(kept_vpn)
    );
    assert!(row("T3")["summary"].is_null() && row("T3")["model"].is_null());
    let t4 = row("T4");
    assert!(t4["summary"].is_null());
    assert!(
        t4["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("summarize: ") && e.contains("8192")),
        "{t4}"
    );

    // Same seed, same input: the same summaries, even sampled at temperature 0.8.
    let second = run_json(&job, &["--set", "summarize.in_flight=1"])?;
    let again = run_rows(&job, &second.run_id)?;
    for id in ["T1", "T2", "T5"] {
        let r = again
            .as_array()
            .and_then(|r| r.iter().find(|r| r["id"] == id))
            .cloned()
            .unwrap_or_default();
        assert_eq!(r["summary"], row(id)["summary"], "{id}");
        assert_eq!(r["prompt_version"], row(id)["prompt_version"]);
    }
    // Another seed is another prompt version and other draws.
    let third = run_json(&job, &["--set", "summarize.seed=8"])?;
    let other = run_rows(&job, &third.run_id)?;
    let summaries = |rows: &serde_json::Value| -> Vec<String> {
        let mut s: Vec<String> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["summary"].as_str().map(str::to_string))
            .collect();
        s.sort();
        s
    };
    assert_ne!(summaries(&other), summaries(&rows));
    assert_ne!(other[0]["prompt_version"], rows[0]["prompt_version"]);
    Ok(())
}

#[test]
#[cfg_attr(
    not(feature = "mistralrs"),
    ignore = "needs the mistralrs feature (on by default)"
)]
fn summarize_config_errors_are_clear_before_any_row() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("tickets.parquet");
    write_tickets(
        &input,
        &[("T1", "Printer", Some("The printer is offline."))],
    )?;
    let bloom = dir.path().join("bloom");
    std::fs::create_dir_all(&bloom)?;
    std::fs::write(bloom.join("config.json"), r#"{"model_type": "bloom"}"#)?;
    let not_model = dir.path().join("empty");
    std::fs::create_dir_all(&not_model)?;
    let cases: [(&str, &[&str]); 10] = [
        (
            "prompt = \"Summarize this\"",
            &["summarize.prompt", "neither a preset"],
        ),
        ("prompt = \"{text} {nope}\"", &["no column `nope`"]),
        (
            "rules = [{ pattern = '(', replace = '' }]",
            &["summarize.rules", "rule `(`", "regular expression"],
        ),
        ("temperature = -1.0", &["summarize.temperature"]),
        (
            "model = \"/no/such/model.gguf\"",
            &["/no/such/model.gguf", "allow_download"],
        ),
        (
            &format!("model = \"{}\"", bloom.display()),
            &["seqgpt backend"],
        ),
        (
            &format!("model = \"{}\"", not_model.display()),
            &["neither config.json", "gguf"],
        ),
        ("backend = \"vllm\"", &["summarize.backend", "mistralrs"]),
        (
            &format!("model = \"{}\"\nbackend = \"llama\"", not_model.display()),
            &["summarize.model", "holds no .gguf file"],
        ),
        (
            "backend = \"llama\"\ndevice = \"cuda\"",
            &["summarize.device"],
        ),
    ];
    for (setting, says) in cases {
        // A later key wins in TOML only by rewriting the file: put the case's line first.
        let job = summarize_job(dir.path(), &input, "")?;
        let text = std::fs::read_to_string(&job)?;
        let key = setting.split(" =").next().unwrap_or_default();
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + setting
            + "\n";
        std::fs::write(&job, text)?;
        let out = abridge(&["run", job.to_str().unwrap_or_default()]);
        assert_eq!(out.status.code(), Some(2), "{setting}: {}", stderr(&out));
        for s in says {
            assert!(
                stderr(&out).contains(s),
                "{setting}: `{s}` not in {}",
                stderr(&out)
            );
        }
        assert!(
            !dir.path().join("out").exists(),
            "{setting}: nothing written"
        );
    }
    Ok(())
}

#[test]
#[cfg_attr(
    not(feature = "mistralrs"),
    ignore = "needs the mistralrs feature (on by default)"
)]
fn metrics_columns_are_written_and_the_sql_functions_recompute_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample(dir.path(), "tickets.parquet", 6, 3)?;
    let encoder = abridge_models::cached_model_dir("minilm-l6-v2");
    let generator = abridge_models::cached_model_dir("smollm2-135m-instruct");
    let job = job_file(
        dir.path(),
        &input,
        &format!(
            "[embed]\nmodel = \"{}\"\n\
             [summarize]\nmodel = \"{}\"\nmax_new_tokens = 24\ntemperature = 0.9\n\
             [metrics]\nstability_samples = 3\n[metrics.alerts]\ncompression_max = 0.9\n",
            encoder.display(),
            generator.display()
        ),
    )?;
    let run = run_json(&job, &[])?;
    assert_eq!(run.status, RunStatus::Committed);
    let stages: Vec<&str> = run.stages.iter().map(|s| s.stage.as_str()).collect();
    assert!(
        stages.ends_with(&["summarize", "embed_summary", "metrics", "sink"]),
        "{stages:?}"
    );
    let query = "SELECT id, rouge1, rouge2, rouge_l, drift, compression, stability, alerts, \
                 cardinality(summary_samples) AS draws, \
                 rouge_n(summary, reference, 1) AS rouge1_sql, \
                 rouge_l(summary, reference) AS rouge_l_sql, \
                 rouge_l_scores(summary, reference)['f1'] AS rouge_l_struct, \
                 cosine(embedding, summary_embedding) AS drift_sql, \
                 compression(summary, text) AS compression_sql \
                 FROM summaries WHERE summary IS NOT NULL";
    let out = sql(&job, query, "json");
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    let rows = rows.as_array().ok_or("rows")?;
    assert!(rows.len() >= 4, "most sample tickets summarized: {rows:?}");
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    for r in rows {
        for (column, recomputed) in [
            ("rouge1", "rouge1_sql"),
            ("rouge_l", "rouge_l_sql"),
            ("rouge_l", "rouge_l_struct"),
            ("drift", "drift_sql"),
            ("compression", "compression_sql"),
        ] {
            assert!(
                (num(r, column) - num(r, recomputed)).abs() < 1e-9,
                "{column} vs {recomputed}: {r}"
            );
        }
        for k in ["rouge1", "rouge2", "rouge_l", "stability"] {
            assert!((0.0..=1.0).contains(&num(r, k)), "{k}: {r}");
        }
        // A cosine: a sampled summary about something else can score below 0.
        assert!((-1.0..=1.0).contains(&num(r, "drift")), "{r}");
        assert!(num(r, "compression") > 0.0, "{r}");
        assert!(r["draws"].as_u64().is_some_and(|n| n <= 2), "{r}");
        // Every alert is one the thresholds call for.
        let alerts: Vec<&str> = r["alerts"]
            .as_array()
            .ok_or("alerts list")?
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(alerts.contains(&"drift"), num(r, "drift") < 0.45, "{r}");
        assert_eq!(
            alerts.contains(&"compression_high"),
            num(r, "compression") > 0.9,
            "{r}"
        );
        assert_eq!(
            alerts.contains(&"stability"),
            num(r, "stability") > 0.03,
            "{r}"
        );
    }
    // Sampling at temperature 0.9 moves at least one row's wording between draws.
    assert!(rows.iter().any(|r| num(r, "stability") > 0.0), "{rows:?}");
    Ok(())
}

/// Writes tickets that carry a summary made elsewhere, in column `draft` (`summary` is a
/// column abridge writes, so an input cannot have it).
fn write_summarized(path: &Path, rows: &[(&str, &str, &str, Option<&str>)]) -> TestResult {
    use std::sync::Arc;
    fn column<'a, R>(rows: &'a [R], pick: impl Fn(&'a R) -> Option<&'a str>) -> Arc<dyn Array> {
        Arc::new(StringArray::from(rows.iter().map(pick).collect::<Vec<_>>()))
    }
    let batch = RecordBatch::try_from_iter([
        ("id", column(rows, |r| Some(r.0))),
        ("text", column(rows, |r| Some(r.1))),
        ("draft", column(rows, |r| Some(r.2))),
        ("reference", column(rows, |r| r.3)),
    ])?;
    write_batch(path, &batch)
}

#[test]
fn eval_remeasures_runs_and_compares_two_on_shared_tickets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let text = "the printer on floor two is offline and jobs are stuck";
    let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
    // Run A: one good and one poor summary; run B: the poor one improved, plus a ticket A
    // does not have, and one without a reference.
    write_summarized(
        &a,
        &[
            (
                "T1",
                text,
                "printer offline jobs stuck",
                Some("printer offline jobs stuck"),
            ),
            (
                "T2",
                text,
                "a meeting & <was> held",
                Some("printer is offline"),
            ),
        ],
    )?;
    write_summarized(
        &b,
        &[
            (
                "T1",
                text,
                "printer offline jobs stuck",
                Some("printer offline jobs stuck"),
            ),
            ("T2", text, "printer is offline", Some("printer is offline")),
            ("T3", text, "printer", None),
        ],
    )?;
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n",
            a.display(),
            dir.path().join("out").display()
        ),
    )?;
    let run_a = run_json(&job, &[])?.run_id;
    // Run B alerts only on summaries longer than 90% of their text.
    let run_b = run_json(
        &job,
        &[
            "--set",
            &format!("input.path={}", b.display()),
            "--set",
            "metrics.alerts.compression_max=0.9",
        ],
    )?
    .run_id;
    let runs = dir.path().join("out");
    let runs = runs.to_str().unwrap_or_default();

    // `abridge eval` of the runs' `draft` column, with more flags, as JSON.
    let eval = |args: &[&str]| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let mut all = vec!["eval", "--runs", runs, "--summary", "draft", "--json"];
        all.extend_from_slice(args);
        let out = abridge(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        Ok(serde_json::from_str(&stdout(&out))?)
    };
    let report = eval(&["--compare", &run_a, &run_b])?;
    let eval_dir = PathBuf::from(report["dir"].as_str().ok_or("dir")?);
    assert!(eval_dir.starts_with(dir.path().join("out").join("_eval")));
    for file in [
        "evaluation.parquet",
        "summary.json",
        "comparison.json",
        "report.html",
    ] {
        assert!(eval_dir.join(file).exists(), "{file}");
    }
    // The report stands alone: no script, nothing fetched; text is escaped.
    let html = std::fs::read_to_string(eval_dir.join("report.html"))?;
    assert!(html.contains(&run_a) && html.contains(&run_b));
    assert!(
        html.matches("<svg").count() >= 5,
        "four histograms and the topic chart"
    );
    assert!(
        html.contains("a meeting &amp; &lt;was&gt; held"),
        "escaped worst example"
    );
    assert!(!html.contains("<script") && !html.contains(" src="));
    let run = |id: &str| {
        report["runs"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["run_id"] == id))
            .cloned()
            .unwrap_or_default()
    };
    // A: ROUGE-1 F1 1.0 and 0.0, mean 0.5. B: 1.0, 1.0 and one row without reference.
    assert_eq!(run(&run_a)["means"]["rouge1"], 0.5);
    assert_eq!(run(&run_b)["means"]["rouge1"], 1.0);
    assert_eq!(run(&run_b)["summarized"], 3);
    assert_eq!(run(&run_b)["without_reference"], 1);
    // Alerts by each run's own thresholds: A's two summaries are over 35% of their text
    // (the default), none of B's over 90%; a flag overrides both (B: 2 of 3 over 20%).
    assert_eq!(run(&run_a)["alerts"]["compression_high"], 2);
    assert_eq!(run(&run_b)["thresholds"]["compression_max"], 0.9);
    assert!(run(&run_b)["alerts"]["compression_high"].is_null());
    let strict = eval(&["--compression-max", "0.2"])?;
    for (i, high) in [2, 2].into_iter().enumerate() {
        assert_eq!(strict["runs"][i]["alerts"]["compression_high"], high);
    }
    let comparison = &report["comparison"];
    assert_eq!(comparison["shared"], 2, "T3 is only in B");
    let rouge_l = comparison["measures"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["measure"] == "rouge_l"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&rouge_l["a_wins"], &rouge_l["b_wins"], &rouge_l["ties"]),
        (
            &serde_json::json!(0),
            &serde_json::json!(1),
            &serde_json::json!(1)
        )
    );
    // The runs themselves are untouched: `abridge sql` still sees two runs, no eval rows.
    let count = sql(&job, "SELECT count(*) AS n FROM runs", "json");
    assert!(stdout(&count).contains("\"n\":5"), "{}", stdout(&count));

    // A reference from another table, joined on id.
    let gold = dir.path().join("gold.parquet");
    write_summarized(&gold, &[("T2", "", "", Some("a meeting was held"))])?;
    let report = eval(&[
        "--run",
        &run_a,
        "--reference-table",
        gold.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(
        report["runs"][0]["means"]["rouge1"], 1.0,
        "T2 against its gold"
    );
    assert_eq!(report["runs"][0]["without_reference"], 1, "T1 has no gold");

    // Only what is asked is computed again; drift from vectors made now, with --encoder.
    let encoder = abridge_models::cached_model_dir("minilm-l6-v2");
    let report = eval(&[
        "--run",
        &run_b,
        "--recompute",
        "compression,drift",
        "--encoder",
        encoder.to_str().unwrap_or_default(),
    ])?;
    let means = &report["runs"][0]["means"];
    assert!(
        means["rouge1"].is_null(),
        "not recomputed, not stored: {means}"
    );
    assert!(
        means["compression"].as_f64().is_some_and(|c| c > 0.0),
        "{means}"
    );
    assert!(
        means["drift"]
            .as_f64()
            .is_some_and(|d| (0.0..=1.0).contains(&d)),
        "{means}"
    );

    // Clear errors, exit code 2.
    for (args, expected) in [
        (vec!["--run", "nope"], "run nope is not a committed run"),
        (vec!["--reference", "gold"], "no `gold` column"),
        (
            vec!["--compare", &run_a, "nope"],
            "run nope is not a committed run",
        ),
    ] {
        let mut all = vec!["eval", "--runs", runs, "--summary", "draft"];
        all.extend(args.iter().copied());
        let out = abridge(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    Ok(())
}

#[test]
fn truncation_is_recorded_per_row_and_compression_measures_what_the_model_saw() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("tickets.parquet");
    let long =
        "The printer on floor two is offline and every print job waits in the queue. ".repeat(40);
    write_tickets(
        &input,
        &[
            ("T1", "Printer", Some("The printer is offline.")),
            ("T2", "Printer", Some(long.as_str())),
        ],
    )?;
    let encoder = abridge_models::cached_model_dir("minilm-l6-v2");
    let bloom = repo().join("tests/fixtures/bloom-tiny-4h");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[embed]\nmodel = \"{}\"\n\
             [summarize]\nbackend = \"seqgpt\"\nmodel = \"{}\"\nprompt = \"seqgpt\"\n\
             max_new_tokens = 8\ntemperature = 0.7\nmax_input_tokens = 16\n",
            input.display(),
            dir.path().join("out").display(),
            encoder.display(),
            bloom.display()
        ),
    )?;
    let run = run_json(&job, &[])?;
    assert_eq!(run.rows_failed, 0);
    let out = sql(
        &job,
        "SELECT id, embedding_cut_tokens AS embed_cut, text_cut_tokens AS prompt_cut, \
         text_cut_chars AS chars_cut, summary_embedding_cut_tokens AS summary_cut, \
         compression, compression(summary, text) AS of_whole_text, \
         compression(summary, left(text, CAST(character_length(text) - text_cut_chars AS BIGINT))) \
         AS of_seen_text FROM summaries ORDER BY id",
        "json",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out))?;
    let (short, cut) = (&rows[0], &rows[1]);
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    // The short ticket fits both limits: nothing cut, compression of its whole text.
    for k in ["embed_cut", "prompt_cut", "chars_cut", "summary_cut"] {
        assert_eq!(short[k], 0, "{k}: {short}");
    }
    assert_eq!(num(short, "compression"), num(short, "of_whole_text"));
    // The long one (over 600 tokens) is cut by MiniLM's 256 and by the 16-token budget,
    // and its compression is against the 16 tokens' worth of text the model saw.
    assert!(num(cut, "embed_cut") > 300.0, "{cut}");
    assert!(num(cut, "prompt_cut") > 500.0, "{cut}");
    assert!(num(cut, "chars_cut") > 2500.0, "{cut}");
    assert!(
        (num(cut, "compression") - num(cut, "of_seen_text")).abs() < 1e-12,
        "{cut}"
    );
    assert!(
        num(cut, "compression") > 10.0 * num(cut, "of_whole_text"),
        "{cut}"
    );
    // `abridge eval` measures it the same way.
    let runs = dir.path().join("out");
    let eval = abridge(&[
        "eval",
        "--runs",
        runs.to_str().unwrap_or_default(),
        "--recompute",
        "compression",
        "--json",
    ]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    let eval: serde_json::Value = serde_json::from_str(&stdout(&eval))?;
    let mean = (num(short, "compression") + num(cut, "compression")) / 2.0;
    let got = eval["runs"][0]["means"]["compression"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!((got - mean).abs() < 1e-9, "{got} vs {mean}");
    Ok(())
}

#[test]
fn seqgpt_backend_summarizes_with_a_bloom_checkpoint() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("tickets.parquet");
    write_tickets(
        &input,
        &[
            ("T1", "Printer", Some("The printer is offline again.")),
            (
                "T2",
                "VPN",
                Some("VPN drops every few minutes when I work from home."),
            ),
            ("T3", "Mail", Some("打印机离线，打印任务卡在队列中。")),
            ("T4", "Login", Some("账户被锁定，无法登录。")),
            ("T5", "Queue", Some("print jobs are stuck")),
        ],
    )?;
    let bloom = repo().join("tests/fixtures/bloom-tiny-4h");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[summarize]\nbackend = \"seqgpt\"\n\
             model = \"{}\"\nprompt = \"seqgpt\"\nmax_new_tokens = 8\ntemperature = 0.7\n\
             glossary_retry = false\nin_flight = 3\n",
            input.display(),
            dir.path().join("out").display(),
            bloom.display()
        ),
    )?;
    let first = run_json(&job, &[])?;
    assert_eq!(first.rows_failed, 0);
    // One sequence at a time instead of batches of three, and batches with their keys and
    // values in the blocks of a paged pool (as on a GPU): the very same summaries.
    let second = run_json(&job, &["--set", "summarize.in_flight=1"])?;
    let paged = run_json(
        &job,
        &[
            "--set",
            "summarize.paged_attention.enabled=true",
            "--set",
            "summarize.paged_attention.block_size=8",
        ],
    )?;
    let (a, b) = (
        run_rows(&job, &first.run_id)?,
        run_rows(&job, &second.run_id)?,
    );
    let c = run_rows(&job, &paged.run_id)?;
    for r in a.as_array().ok_or("rows")? {
        assert!(r["summary"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
        assert!(
            r["model"]
                .as_str()
                .is_some_and(|m| m.contains("bloom-tiny-4h"))
        );
        let tokens = r["completion_tokens"].as_u64().unwrap_or(0);
        assert!((1..=8).contains(&tokens), "{r}");
        // SeqGPT's prompt around the text: more tokens than the text alone.
        assert!(r["prompt_tokens"].as_u64().unwrap_or(0) > 10, "{r}");
    }
    let summaries = |rows: &serde_json::Value| -> Vec<serde_json::Value> {
        rows.as_array()
            .into_iter()
            .flatten()
            .map(|r| r["summary"].clone())
            .collect()
    };
    assert_eq!(a.as_array().map(Vec::len), Some(5));
    assert_eq!(summaries(&a), summaries(&b), "same seed, same summaries");
    assert_eq!(
        summaries(&a),
        summaries(&c),
        "paged attention, same summaries"
    );
    // In bfloat16 (a half forward on the CPU, rounded as transformers rounds it): every row
    // summarized, and the paged pool gives the same summaries as caches of their own.
    let half = ["--set", "summarize.dtype=bfloat16"];
    let bf16 = run_json(&job, &half)?;
    let bf16_paged = run_json(
        &job,
        &[
            half[0],
            half[1],
            "--set",
            "summarize.paged_attention.enabled=true",
        ],
    )?;
    assert_eq!((bf16.rows_failed, bf16_paged.rows_failed), (0, 0));
    let (e, f) = (
        run_rows(&job, &bf16.run_id)?,
        run_rows(&job, &bf16_paged.run_id)?,
    );
    assert_eq!(summaries(&e), summaries(&f), "bfloat16, paged or not");
    assert_eq!(e.as_array().map(Vec::len), Some(5));

    // Rules that leave nothing of any answer: every row fails as empty, yet keeps the
    // tokens and time its answer took (the same answers as the first run's).
    let emptied = run_json(
        &job,
        &[
            "--set",
            "summarize.rules=[{pattern = '(?s).+', replace = ''}]",
        ],
    )?;
    assert_eq!(emptied.rows_failed, 5);
    let d = run_rows(&job, &emptied.run_id)?;
    let counts =
        |r: &serde_json::Value| (r["prompt_tokens"].clone(), r["completion_tokens"].clone());
    for (r, first) in d
        .as_array()
        .into_iter()
        .flatten()
        .zip(a.as_array().into_iter().flatten())
    {
        assert_eq!(
            r["error"].as_str(),
            Some("summarize: the model returned an empty summary"),
            "{r}"
        );
        assert!(r["summary"].is_null(), "{r}");
        assert!(r["latency_ms"].as_u64().is_some(), "{r}");
        assert_eq!(counts(r), counts(first), "{r}");
    }
    assert_eq!(d.as_array().map(Vec::len), Some(5));

    // The same checkpoint through mistral.rs is refused with a pointer to this backend.
    let out = abridge(&[
        "run",
        job.to_str().unwrap_or_default(),
        "--set",
        "summarize.backend=mistralrs",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let pointer = match cfg!(feature = "mistralrs") {
        true => "summarize.backend = \"seqgpt\"",
        false => "built without mistral.rs",
    };
    assert!(stderr(&out).contains(pointer), "{}", stderr(&out));
    Ok(())
}
