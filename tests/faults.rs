//! Fault tests: the real `abridge` binary killed, resumed, split into shards and rerun
//! incrementally, checked row by row against one uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use abridge_operators::index::TicketIndex;
use abridge_pipeline::run::{RUN_DIR_PREFIX, RunManifest, RunStatus};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn abridge() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_abridge"));
    command.current_dir(repo());
    command
}

fn run(args: &[&str]) -> Output {
    abridge()
        .args(args)
        .output()
        .expect("the abridge binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A job with every stage: encoder, similarity filter, index, summarizer (the tiny BLOOM
/// checkpoint, greedy, so that results are deterministic) and metrics, writing small
/// files so that a run commits many times.
fn full_job(dir: &Path, rows: usize) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let input = dir.join("tickets.parquet");
    let out = run(&[
        "sample",
        "--rows",
        &rows.to_string(),
        "--seed",
        "11",
        "--out",
        input.to_str().unwrap_or_default(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let encoder = abridge_operators::encoder::bert::cached_model_dir("minilm-l6-v2");
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[input]
path = "{input}"
[input.columns]
id = "ticket_id"
title = "subject"
text = "body"
created_at = "opened_at"
reference = "resolution_summary"
[output]
path = "{out}"
rows_per_file = 8
[run]
batch_size = 8
[embed]
model = "{encoder}"
input = "{{title}}\n{{text}}"
[filter.similarity]
queries = ["a device or service is down and the employee cannot work"]
threshold = 0.1
[index]
path = "{index}"
[summarize]
backend = "seqgpt"
model = "{bloom}"
prompt = "seqgpt"
max_new_tokens = 8
temperature = 0.0
glossary_retry = false
"#,
            input = input.display(),
            out = dir.join("out").display(),
            index = dir.join("index").display(),
            encoder = encoder.display(),
            bloom = repo().join("tests/fixtures/bloom-tiny-4h").display(),
        ),
    )?;
    Ok(job)
}

/// `--set` arguments that send a run of the job to its own output table and index.
fn elsewhere(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--set".into(),
        format!("output.path={}", dir.join(name).join("out").display()),
        "--set".into(),
        format!("index.path={}", dir.join(name).join("index").display()),
    ]
}

/// An uninterrupted run of the job into `dir/reference` (its own table and index): what
/// the faulted runs are compared with.
struct Reference {
    rows: Vec<String>,
    manifest: RunManifest,
    /// Tickets in its index.
    docs: u64,
    /// How long it took, start to end.
    took: Duration,
}

fn reference_run(dir: &Path, job: &Path) -> Result<Reference, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let out = abridge()
        .args(["run", job.to_str().unwrap_or_default(), "--quiet"])
        .args(elsewhere(dir, "reference"))
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let took = started.elapsed();
    let run_dir = only_run(&dir.join("reference/out"))?;
    Ok(Reference {
        rows: table_rows(std::slice::from_ref(&run_dir))?,
        manifest: RunManifest::read(&run_dir)?,
        docs: TicketIndex::open(&dir.join("reference/index"))?.num_docs()?,
        took,
    })
}

/// The run folders of an output table (none when it does not exist yet).
fn run_dirs(output: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(RUN_DIR_PREFIX))
        })
        .collect()
}

/// The only run folder of an output table.
fn only_run(output: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let runs = run_dirs(output);
    assert_eq!(runs.len(), 1, "one run in {}: {runs:?}", output.display());
    Ok(runs[0].clone())
}

/// Every row of the data files under `dirs`, each as one line of its values (all columns
/// but the run's id and the measured latency), sorted: equal tables give equal lists.
fn table_rows(dirs: &[PathBuf]) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if !name.is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet")) {
                continue;
            }
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path)?)?.build()?;
            for batch in reader {
                rows.extend(lines(&batch?)?);
            }
        }
    }
    rows.sort();
    Ok(rows)
}

fn lines(batch: &RecordBatch) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let options = FormatOptions::default().with_null("∅");
    let schema = batch.schema();
    let mut formatters = Vec::new();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if ["run_id", "latency_ms"].contains(&field.name().as_str()) {
            continue;
        }
        formatters.push((
            field.name().clone(),
            ArrayFormatter::try_new(column, &options)?,
        ));
    }
    // `id` first, so that the sorted lines are in id order.
    formatters.sort_by_key(|(name, _)| name != "id");
    Ok((0..batch.num_rows())
        .map(|row| {
            formatters
                .iter()
                .map(|(name, f)| format!("{name}={}", f.value(row)))
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect())
}

/// Whether two values agree: equal text, with numbers equal to 1e-5. Vectors and the
/// measures computed from them (similarity, drift) change in their last bits with how
/// rows are batched (padding changes the summation order in the encoder's kernels), and
/// a resumed or sharded run batches its rows differently.
fn same_value(a: &str, b: &str) -> bool {
    let tokens = |s: &str| -> Vec<String> {
        s.split([',', ' ', '[', ']', '='])
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (x, y) = (tokens(a), tokens(b));
    x.len() == y.len()
        && x.iter().zip(&y).all(|(p, q)| {
            p == q
                || match (p.parse::<f64>(), q.parse::<f64>()) {
                    (Ok(p), Ok(q)) => (p - q).abs() <= 1e-5,
                    _ => false,
                }
        })
}

/// Asserts two tables' rows are equal ([`same_value`] for each column); on a
/// difference, names the first differing row's id and columns instead of printing both
/// tables.
fn assert_same_rows(got: &[String], want: &[String], what: &str) {
    let id = |line: &str| line.split(" | ").next().unwrap_or_default().to_string();
    let ids = |rows: &[String]| rows.iter().map(|r| id(r)).collect::<Vec<_>>();
    let (got_ids, want_ids) = (ids(got), ids(want));
    if got_ids != want_ids {
        let missing: Vec<_> = want_ids.iter().filter(|i| !got_ids.contains(i)).collect();
        let extra: Vec<_> = got_ids.iter().filter(|i| !want_ids.contains(i)).collect();
        panic!(
            "{what}: {} rows vs {}; missing {missing:?}, extra or repeated {extra:?}",
            got.len(),
            want.len()
        );
    }
    for (a, b) in got.iter().zip(want) {
        let fields = |line: &str| line.split(" | ").count();
        let differing: Vec<String> = a
            .split(" | ")
            .zip(b.split(" | "))
            .filter(|(x, y)| !same_value(x, y))
            .map(|(x, y)| {
                let short = |s: &str| s.chars().take(120).collect::<String>();
                format!("{} vs {}", short(x), short(y))
            })
            .collect();
        assert!(
            differing.is_empty() && fields(a) == fields(b),
            "{what}: row {} differs: {differing:?}",
            id(a)
        );
    }
}

/// Published data files of a run folder.
fn published(run_dir: &Path) -> usize {
    std::fs::read_dir(run_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                .count()
        })
        .unwrap_or(0)
}

/// xorshift64*: the kill points are seeded, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// kill -9 at seeded points of runs (model loading, reading, summarizing, committing
/// files and the index), each time followed by `--resume`: the finished tables equal an
/// uninterrupted run's row for row (metrics and summaries included), the manifests count
/// every row once, and the index holds exactly the table's tickets.
#[test]
fn killed_runs_resume_to_the_table_of_an_uninterrupted_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let job = full_job(dir.path(), 80)?;
    let job_arg = job.to_str().unwrap_or_default();

    let Reference {
        rows: reference,
        manifest: reference_manifest,
        docs: reference_docs,
        took: whole,
    } = reference_run(dir.path(), &job)?;
    assert!(reference.len() > 40, "{} rows", reference.len());
    // The tiny random model loops ("fififi..."): its summaries are cut and flagged.
    assert!(
        reference
            .iter()
            .any(|r| r.contains("finish_reason=repetition") && r.contains("summary=fi |")),
        "no summary was cut as a loop"
    );
    assert_eq!(
        reference_docs,
        reference_manifest.rows_written - reference_manifest.rows_failed,
        "the index holds every written ticket without an error"
    );

    let mut rng = Rng(0x5eed_0001);
    let (mut kills, mut sequences) = (0, 0);
    let mut files_at_kill = std::collections::BTreeSet::new();
    while kills < 24 {
        let name = format!("seq{sequences}");
        let set = elsewhere(dir.path(), &name);
        let output = dir.path().join(&name).join("out");
        for attempt in 0.. {
            let mut args = vec!["run", job_arg, "--quiet"];
            if attempt > 0 {
                args.push("--resume");
            }
            args.extend(set.iter().map(String::as_str));
            let mut child = abridge()
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            // Up to 6 kills per sequence, then one attempt runs to the end.
            if attempt < 6 {
                let delay = whole.mul_f64(0.05 + 0.9 * rng.unit());
                let deadline = Instant::now() + delay;
                while Instant::now() < deadline && child.try_wait()?.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if child.try_wait()?.is_none() {
                    child.kill()?; // SIGKILL
                    child.wait()?;
                    kills += 1;
                    // The kill may land before the run folder exists (nothing to resume
                    // yet: `--resume` starts the first run) or after the commit, while the
                    // process exits (the run is finished: nothing left to resume).
                    let run = run_dirs(&output).into_iter().next();
                    files_at_kill.insert(run.as_deref().map_or(0, published));
                    let committed = run.is_some_and(|d| {
                        RunManifest::read(&d).is_ok_and(|m| m.status == RunStatus::Committed)
                    });
                    if !committed {
                        continue;
                    }
                    break;
                }
            }
            let out = child.wait_with_output()?;
            assert!(out.status.success(), "attempt {attempt}: {}", stderr(&out));
            break;
        }

        let run_dir = only_run(&output)?;
        let manifest = RunManifest::read(&run_dir)?;
        assert_eq!(manifest.status, RunStatus::Committed);
        assert_same_rows(
            &table_rows(std::slice::from_ref(&run_dir))?,
            &reference,
            &format!("sequence {sequences}: resumed vs uninterrupted"),
        );
        assert_eq!(
            (
                manifest.rows_written,
                manifest.rows_failed,
                manifest.rows_filtered
            ),
            (
                reference_manifest.rows_written,
                reference_manifest.rows_failed,
                reference_manifest.rows_filtered
            )
        );
        // Row conservation over all attempts (the input did not change between them).
        assert_eq!(
            manifest.rows_read,
            manifest.rows_written + manifest.duplicates_dropped
        );
        let docs = TicketIndex::open(&dir.path().join(&name).join("index"))?.num_docs()?;
        assert_eq!(docs, reference_docs, "sequence {sequences}: index size");
        sequences += 1;
    }
    eprintln!(
        "{kills} kills over {sequences} sequences; published files at the kills: {files_at_kill:?}; uninterrupted run {whole:?}"
    );
    assert!(
        files_at_kill.len() >= 3,
        "kills landed at enough different points: {files_at_kill:?} published files"
    );
    Ok(())
}

/// Four shards run as four processes side by side give the table of one unsharded run,
/// and `summaries` is their union; a committed shard is not run twice.
#[test]
fn four_shards_side_by_side_make_the_table_of_one_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let job = full_job(dir.path(), 60)?;
    let job_arg = job.to_str().unwrap_or_default();
    let reference = reference_run(dir.path(), &job)?.rows;

    let shards: Vec<_> = (0..4)
        .map(|i| {
            abridge()
                .args([
                    "run",
                    job_arg,
                    "--shard",
                    &format!("{i}/4"),
                    "--run-group",
                    "night-1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut rows_read = 0;
    for (i, child) in shards.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        assert!(out.status.success(), "shard {i}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("shard runs do not write the index"),
            "{}",
            stderr(&out)
        );
    }
    let output = dir.path().join("out");
    let mut run_dirs = Vec::new();
    for i in 0..4 {
        let run_dir = output.join(format!("{RUN_DIR_PREFIX}night-1.{i}of4"));
        let manifest = RunManifest::read(&run_dir)?;
        assert_eq!(manifest.status, RunStatus::Committed);
        assert_eq!(
            manifest.rows_read,
            manifest.rows_written + manifest.duplicates_dropped + manifest.rows_other_shards
        );
        rows_read = manifest.rows_read;
        run_dirs.push(run_dir);
    }
    assert_same_rows(&table_rows(&run_dirs)?, &reference, "4 shards vs 1 run");
    assert_eq!(rows_read, 60, "each shard reads the whole input");

    let out = run(&[
        "sql",
        "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM summaries",
        "--job",
        job_arg,
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let n = reference.len();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().nth(1),
        Some(format!("{n},{n}").as_str())
    );

    let out = run(&["run", job_arg, "--shard", "2/4", "--run-group", "night-1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already committed"),
        "{}",
        stderr(&out)
    );
    let out = run(&["run", job_arg, "--shard", "4/4", "--run-group", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    Ok(())
}

/// Writes tickets (`id`, `title`, `text`) to a Parquet file.
fn write_tickets(path: &Path, rows: &[(&str, &str)]) -> TestResult {
    use arrow::array::StringArray;
    use std::sync::Arc;
    let column = |values: Vec<&str>| Arc::new(StringArray::from(values)) as arrow::array::ArrayRef;
    let batch = RecordBatch::try_from_iter([
        ("id", column(rows.iter().map(|r| r.0).collect())),
        ("title", column(rows.iter().map(|_| "Ticket").collect())),
        ("text", column(rows.iter().map(|r| r.1).collect())),
    ])?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

fn run_json(args: &[&str]) -> Result<RunManifest, Box<dyn std::error::Error>> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = run(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `skip_done`: a nightly run processes only new tickets and tickets whose text changed;
/// a change of the summarizer's settings makes every ticket new again.
#[test]
fn skip_done_processes_only_new_and_changed_tickets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("tickets.parquet");
    let tickets = [
        ("T1", "The printer is offline again."),
        ("T2", "VPN drops every few minutes."),
        ("T3", "打印机离线，打印任务卡在队列中。"),
        ("T4", "账户被锁定，无法登录。"),
        ("T5", "Outlook does not sync."),
    ];
    write_tickets(&input, &tickets)?;
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[run]\nskip_done = true\n\
             [summarize]\nbackend = \"seqgpt\"\nmodel = \"{}\"\nprompt = \"seqgpt\"\n\
             max_new_tokens = 4\ntemperature = 0.0\nglossary_retry = false\n",
            input.display(),
            dir.path().join("out").display(),
            repo().join("tests/fixtures/bloom-tiny-4h").display()
        ),
    )?;
    let job_arg = job.to_str().unwrap_or_default();
    let first = run_json(&["run", job_arg])?;
    assert_eq!((first.rows_written, first.rows_skipped_done), (5, 0));

    let mut next = tickets.to_vec();
    next[1].1 = "VPN drops every few minutes, also on the office wifi.";
    next.push(("T6", "New laptop request."));
    write_tickets(&input, &next)?;
    let second = run_json(&["run", job_arg])?;
    assert_eq!((second.rows_written, second.rows_skipped_done), (2, 4));
    assert_eq!(second.rows_read, 6);
    let out = run(&[
        "sql",
        &format!(
            "SELECT id FROM runs WHERE run_id = '{}' ORDER BY id",
            second.run_id
        ),
        "--job",
        job_arg,
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "id\nT2\nT6\n");

    let third = run_json(&["run", job_arg, "--set", "summarize.max_new_tokens=5"])?;
    assert_eq!((third.rows_written, third.rows_skipped_done), (6, 0));
    Ok(())
}

/// A tmpfs of `size` mounted at `at` for the life of the value (tests run as root in CI).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(Self(at.to_path_buf())),
            false => Err(stderr(&out)),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The output's disk fills up while a run commits: the run fails with an error naming the
/// file and the cause, the files it had published stay whole, and once space is freed a
/// resume completes the table of an uninterrupted run.
#[test]
fn a_full_disk_fails_the_run_cleanly_and_a_resume_completes_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let disk = match Tmpfs::mount(&dir.path().join("disk"), "1m") {
        Ok(disk) => disk,
        // Mounting needs root (as CI runs): say so rather than pass silently.
        Err(why) => {
            eprintln!("a_full_disk_fails_the_run_cleanly...: not run, no tmpfs: {why}");
            return Ok(());
        }
    };
    let job = full_job(dir.path(), 80)?;
    let job_arg = job.to_str().unwrap_or_default();
    let reference = reference_run(dir.path(), &job)?.rows;

    // Room for a few data files, not for all of them.
    let ballast = disk.0.join("ballast");
    std::fs::write(&ballast, vec![7u8; 1024 * 1024 - 160 * 1024])?;
    let output = disk.0.join("out");
    let set = [
        "--set".to_string(),
        format!("output.path={}", output.display()),
    ];
    let mut args = vec!["run", job_arg];
    args.extend(set.iter().map(String::as_str));
    let out = run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains(".parquet"),
        "names the cause and the file: {err}"
    );
    let run_dir = only_run(&output)?;
    let kept = published(&run_dir);
    assert!(kept > 0, "some files were published before the disk filled");
    // Every published file is whole: it reads to its end.
    table_rows(std::slice::from_ref(&run_dir))?;

    std::fs::remove_file(&ballast)?;
    args.push("--resume");
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{kept} files committed by earlier attempts")),
        "{}",
        stderr(&out)
    );
    assert_same_rows(
        &table_rows(&[only_run(&output)?])?,
        &reference,
        "resumed after a full disk vs uninterrupted",
    );
    Ok(())
}

/// Runs `abridge ARGS` with failpoints set (`FAILPOINTS`, the `fail` crate's syntax).
fn run_failing(failpoints: &str, args: &[&str]) -> Output {
    abridge()
        .args(args)
        .env("FAILPOINTS", failpoints)
        .output()
        .expect("the abridge binary runs")
}

/// Failpoints in the generator, the sink and between a file's publication and the index
/// commit: generator errors land in their rows' `error`; a failing publish is retried,
/// and when it keeps failing the run fails cleanly and a resume completes it; a crash
/// between the two commits is repaired by the resume (the index catches up).
#[test]
fn injected_failures_fail_rows_retry_commits_and_survive_a_crash_between_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let job = full_job(dir.path(), 40)?;
    let job_arg = job.to_str().unwrap_or_default();
    let with = |name: &str, extra: &[&'static str]| -> Vec<String> {
        let mut args = vec!["run".to_string(), job_arg.to_string(), "--json".into()];
        args.extend(elsewhere(dir.path(), name));
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    fn strs(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    let Reference {
        rows: reference,
        manifest: reference_manifest,
        docs: reference_docs,
        ..
    } = reference_run(dir.path(), &job)?;

    // Three generator requests fail: three more rows with an error, the run commits.
    let out = run_failing(
        "summarize::generate=3*return",
        &strs(&with("generator", &[])),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: RunManifest = serde_json::from_slice(&out.stdout)?;
    assert_eq!(manifest.rows_failed, reference_manifest.rows_failed + 3);
    let rows = table_rows(&[only_run(&dir.path().join("generator/out"))?])?;
    let injected = rows
        .iter()
        .filter(|r| r.contains("error=summarize: injected generator error"))
        .count();
    assert_eq!(injected, 3);

    // The engine fails a decoding step (a panic): the rows in that batch fail, the
    // engine restarts its batch and every other row is summarized as in the reference.
    let out = run_failing(
        "batch::step=3*off->1*panic(injected)->off",
        &strs(&with("engine", &[])),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: RunManifest = serde_json::from_slice(&out.stdout)?;
    let lost = manifest.rows_failed - reference_manifest.rows_failed;
    assert!((1..=8).contains(&lost), "{lost} rows failed with the step");
    let rows = table_rows(&[only_run(&dir.path().join("engine/out"))?])?;
    let restarted = rows
        .iter()
        .filter(|r| r.contains("the engine restarted its batch"))
        .count();
    assert_eq!(restarted as u64, lost);
    let untouched: Vec<_> = rows.iter().filter(|r| !r.contains("restarted")).collect();
    assert!(
        untouched.iter().all(|r| reference.contains(r)),
        "the other rows are the reference's"
    );

    // Two failed publishes are retried away: the table is the reference's.
    let out = run_failing("sink::publish=2*return", &strs(&with("retried", &[])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_rows(
        &table_rows(&[only_run(&dir.path().join("retried/out"))?])?,
        &reference,
        "publish retried vs reference",
    );

    // Publishing keeps failing: the run fails naming the file; a resume completes it.
    let out = run_failing("sink::publish=return", &strs(&with("unpublished", &[])));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("part-00000.parquet") && err.contains("after 3 attempts"),
        "{err}"
    );
    let out = run(&strs(&with("unpublished", &["--resume"])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_rows(
        &table_rows(&[only_run(&dir.path().join("unpublished/out"))?])?,
        &reference,
        "resumed after failed publishes vs reference",
    );

    // The process dies after publishing its third file, before the index commits it.
    let out = run_failing(
        "index::before_commit=2*off->return",
        &strs(&with("crashed", &[])),
    );
    assert!(!out.status.success(), "the process aborted");
    let run_dir = only_run(&dir.path().join("crashed/out"))?;
    assert_eq!(published(&run_dir), 3);
    let out = run(&strs(&with("crashed", &["--resume"])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("brought in step"), "{}", stderr(&out));
    assert_same_rows(
        &table_rows(&[run_dir])?,
        &reference,
        "resumed after a crash between commits vs reference",
    );
    let docs = TicketIndex::open(&dir.path().join("crashed/index"))?.num_docs()?;
    assert_eq!(docs, reference_docs, "the index holds the table's tickets");
    Ok(())
}
