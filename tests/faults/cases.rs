//! The fault tests (see `tests/faults.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{change_weights_in_place, own_bloom};
use abridge_operators::index::TicketIndex;
use abridge_pipeline::table::manifest::{RUN_DIR_PREFIX, RunManifest, RunStatus};
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
    let input = sample_tickets(dir, rows, 11, false)?;
    let encoder = abridge_models::cached_model_dir("minilm-l6-v2");
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
commit_every_rows = 8
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
    /// The ids of the tickets in its index, sorted.
    index_ids: Vec<String>,
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
        index_ids: TicketIndex::open(&dir.join("reference/index"))?.ids()?,
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

/// How a test stops a run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// kill -9.
    Kill,
    /// SIGTERM: the run drains, commits what is in flight and exits 143.
    Term,
    /// SIGTERM twice: the run stops at once and exits 143.
    TermTwice,
}

impl Stop {
    fn pick(rng: &mut Rng) -> Self {
        [Stop::Kill, Stop::Term, Stop::TermTwice][(rng.unit() * 3.0) as usize % 3]
    }

    /// Stops `child` and waits for it; checks a SIGTERM's exit code (143, or 0 when the
    /// run had finished) and that a run it stopped is recorded as interrupted.
    fn apply(self, child: &mut std::process::Child, output: &Path) -> TestResult {
        // Not yet waited for, the child's pid is its own even if it has just exited.
        let term = || {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
        };
        match self {
            Stop::Kill => child.kill()?,
            Stop::Term => {
                term()?;
            }
            Stop::TermTwice => {
                term()?;
                std::thread::sleep(Duration::from_millis(20));
                term()?;
            }
        }
        let status = child.wait()?;
        if self != Stop::Kill {
            let mut err = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut err)?;
            }
            assert!(
                matches!(status.code(), Some(143) | Some(0)),
                "{self:?}: {status:?}: {err}"
            );
            // Stopped while loading (the run folder, if an earlier attempt made it, is left
            // as that attempt left it), or recorded as interrupted.
            if status.code() == Some(143) && !err.contains("before the run began writing") {
                let run = run_dirs(output).into_iter().next();
                let status = run.map(|d| RunManifest::read(&d).map(|m| m.status));
                assert!(
                    matches!(status, Some(Ok(RunStatus::Interrupted))),
                    "{self:?}: the manifest says {status:?}: {err}"
                );
            }
        }
        Ok(())
    }
}

/// kill -9 and SIGTERM (once or twice), mixed, at seeded points of runs (model loading,
/// reading, summarizing, committing files and the index), each time followed by
/// `--resume`: the finished tables equal an uninterrupted run's row for row (metrics and
/// summaries included), the manifests count every row once, and the index holds exactly
/// the table's tickets.
#[test]
fn killed_runs_resume_to_the_table_of_an_uninterrupted_run() -> TestResult {
    soak(24, 0x5eed_0001)
}

/// `scripts/soak`: [`killed_runs_resume_to_the_table_of_an_uninterrupted_run`] with
/// `ABRIDGE_SOAK_STOPS` stops (default 200) from seed `ABRIDGE_SOAK_SEED`.
#[test]
#[ignore = "long: scripts/soak runs it"]
fn soak_from_env() -> TestResult {
    let number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    soak(
        number("ABRIDGE_SOAK_STOPS", 200) as usize,
        number("ABRIDGE_SOAK_SEED", 0x5eed_0001),
    )
}

/// The ids of the rows without an `error` in `rows` ([`table_rows`] lines): the tickets
/// the index must hold.
fn indexable_ids(rows: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|r| r.contains(" | error=∅"))
        .filter_map(|r| {
            r.split(" | ")
                .next()?
                .strip_prefix("id=")
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids
}

/// Runs of the every-stage job stopped `wanted` times in all at seeded points, each
/// sequence resumed to its end and compared with an uninterrupted run.
fn soak(wanted: usize, seed: u64) -> TestResult {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let job = full_job(dir.path(), 80)?;
    let job_arg = job.to_str().unwrap_or_default();

    let Reference {
        rows: reference,
        manifest: reference_manifest,
        index_ids: reference_ids,
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
        reference_ids,
        indexable_ids(&reference),
        "the index holds every written ticket without an error, by id"
    );

    let mut rng = Rng(seed);
    let mut attempts = 0;
    let (mut kills, mut sequences) = (0, 0);
    let mut files_at_kill = std::collections::BTreeSet::new();
    let mut stops = std::collections::BTreeMap::new();
    while kills < wanted {
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
            attempts += 1;
            // Up to 6 stops per sequence, then one attempt runs to the end.
            if attempt < 6 {
                let delay = whole.mul_f64(0.05 + 0.9 * rng.unit());
                let stop = Stop::pick(&mut rng);
                let deadline = Instant::now() + delay;
                while Instant::now() < deadline && child.try_wait()?.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if child.try_wait()?.is_none() {
                    stop.apply(&mut child, &output)?;
                    kills += 1;
                    *stops.entry(format!("{stop:?}")).or_insert(0) += 1;
                    // The stop may land before the run folder exists (nothing to resume
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
        let ids = TicketIndex::open(&dir.path().join(&name).join("index"))?.ids()?;
        assert_eq!(
            ids, reference_ids,
            "sequence {sequences}: the index's tickets"
        );
        sequences += 1;
    }
    eprintln!(
        "soak: {kills} stops ({stops:?}) over {sequences} sequences, {attempts} runs \
         ({} resumes), {} rows each ({} indexed), {:.0} s in all; published files at the \
         stops: {files_at_kill:?}; uninterrupted run {whole:?}",
        attempts - sequences,
        reference.len(),
        reference_ids.len(),
        started.elapsed().as_secs_f64()
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

    // The next night, three of four shards have committed: `summaries` stays the last
    // complete night, and says why; --run-group reads the partial night on purpose.
    for i in 0..3 {
        let shard = format!("{i}/4");
        let out = run(&["run", job_arg, "--shard", &shard, "--run-group", "night-2"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let count = |extra: &[&str]| {
        let mut args = vec![
            "sql",
            "SELECT count(*) AS n FROM summaries",
            "--job",
            job_arg,
            "--format",
            "csv",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let n: usize = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        (n, stderr(&out))
    };
    let (whole, note) = count(&[]);
    assert_eq!(whole, n, "{note}");
    assert!(
        note.contains("night-2") && note.contains("3 of 4 shards"),
        "{note}"
    );
    let (partial, _) = count(&["--run-group", "night-2"]);
    assert!((1..n).contains(&partial), "{partial} of {n}");

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
    write_batch(path, &batch)
}

/// Writes `batch` as a Parquet file.
fn write_batch(path: &Path, batch: &RecordBatch) -> TestResult {
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), None)?;
    writer.write(batch)?;
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
/// a change of the summarizer's settings, or of its weights in place, makes every ticket
/// new again.
#[test]
fn skip_done_processes_only_new_and_changed_tickets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let model = own_bloom(dir.path())?;
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
            model.display()
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

    let set = ["--set", "summarize.max_new_tokens=5"];
    let third = run_json(&["run", job_arg, set[0], set[1]])?;
    assert_eq!((third.rows_written, third.rows_skipped_done), (6, 0));
    let fourth = run_json(&["run", job_arg, set[0], set[1]])?;
    assert_eq!((fourth.rows_written, fourth.rows_skipped_done), (0, 6));

    // The same path and size, other weights: nothing the old weights computed is reused.
    change_weights_in_place(&model)?;
    let fifth = run_json(&["run", job_arg, set[0], set[1]])?;
    assert_eq!((fifth.rows_written, fifth.rows_skipped_done), (6, 0));
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
///
/// Mounting needs root: the test is ignored by a plain `cargo test`, and `scripts/test`
/// runs it when it is root (as CI is) and says it skipped it otherwise. Run where it
/// cannot mount, it fails.
#[test]
#[ignore = "needs root to mount a tmpfs; scripts/test runs it as root"]
fn a_full_disk_fails_the_run_cleanly_and_a_resume_completes_it_needs_root() -> TestResult {
    let dir = tempfile::tempdir()?;
    let disk = Tmpfs::mount(&dir.path().join("disk"), "1m")
        .map_err(|why| format!("cannot mount a tmpfs (root?): {why}"))?;
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
        index_ids: reference_ids,
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

    // A failed fsync is not retried: the file is dropped and the run fails naming it;
    // a resume writes those rows again and completes the table.
    let out = run_failing("sink::sync=1*off->return", &strs(&with("unsynced", &[])));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("part-00001.parquet") && err.contains("(fsync)"),
        "{err}"
    );
    let run_dir = only_run(&dir.path().join("unsynced/out"))?;
    assert_eq!(
        published(&run_dir),
        1,
        "only the file synced before is published"
    );
    let out = run(&strs(&with("unsynced", &["--resume"])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_rows(
        &table_rows(&[run_dir])?,
        &reference,
        "resumed after a failed fsync vs reference",
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
    let ids = TicketIndex::open(&dir.path().join("crashed/index"))?.ids()?;
    assert_eq!(ids, reference_ids, "the index holds the table's tickets");
    Ok(())
}

/// `abridge sample` tickets in `dir/tickets.parquet` (`clean`: no repeated ids, no empty
/// bodies).
fn sample_tickets(
    dir: &Path,
    rows: usize,
    seed: u64,
    clean: bool,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let input = dir.join("tickets.parquet");
    let (rows, seed) = (rows.to_string(), seed.to_string());
    let mut args = vec!["sample", "--rows", &rows, "--seed", &seed];
    if clean {
        args.push("--clean");
    }
    args.extend(["--out", input.to_str().unwrap_or_default()]);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(input)
}

/// A job without models (scan, normalize, dedup, sink) over `input`, committing every
/// `commit_rows` rows; `extra` is appended to the job file.
fn plain_job(
    dir: &Path,
    input: &Path,
    commit_rows: usize,
    extra: &str,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let job = dir.join("plain.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[input.columns]\nid = \"ticket_id\"\ntitle = \"subject\"\n\
             text = \"body\"\n[output]\npath = \"{}\"\ncommit_every_rows = {commit_rows}\n\
             commit_every_s = 3600\n{extra}",
            input.display(),
            dir.join("out").display(),
        ),
    )?;
    Ok(job)
}

/// Writes `rows` of (ticket_id, body) to a Parquet file with the sample's column names.
fn write_raw_tickets(path: &Path, rows: &[(Option<String>, String)]) -> TestResult {
    use arrow::array::StringArray;
    use std::sync::Arc;
    let batch = RecordBatch::try_from_iter([
        (
            "ticket_id",
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0.clone())))
                as arrow::array::ArrayRef,
        ),
        (
            "subject",
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "Ticket"))),
        ),
        (
            "body",
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.clone()),
            )),
        ),
    ])?;
    write_batch(path, &batch)
}

/// A kill -9 once 90% of a 20,000-ticket job's rows have reached the writer: the resumed
/// run keeps everything but the last, unfinished commit interval, which the manifest
/// counts.
#[test]
fn a_kill_at_90_percent_redoes_at_most_one_commit_interval() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample_tickets(dir.path(), 20000, 5, true)?;
    let interval = 1300;
    let job = plain_job(dir.path(), &input, interval, "[run]\nbatch_size = 100\n")?;
    let job_arg = job.to_str().unwrap_or_default();
    let reference = reference_run_plain(dir.path(), &job)?;

    // The writer is handed 180 batches of at most 100 rows, then the process dies.
    let out = run_failing("sink::write=180*off->return", &["run", job_arg, "--quiet"]);
    assert!(!out.status.success(), "the process aborted");
    let run_dir = only_run(&dir.path().join("out"))?;
    // The manifest, rewritten at each commit, says what the killed attempt committed, and
    // `abridge status` shows the run as stopped (no live process holds it).
    let killed = RunManifest::read(&run_dir)?;
    assert_eq!(killed.status, RunStatus::Running);
    assert!(killed.rows_per_s.is_some_and(|r| r > 0.0), "{killed:?}");
    let out = run(&["status", job_arg, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown[0]["state"], "stopped", "{shown}");
    assert_eq!(shown[0]["rows_written"], killed.rows_written, "{shown}");

    let manifest = run_json(&["run", job_arg, "--resume"])?;
    assert_eq!(manifest.attempts, 2);
    assert_eq!(manifest.rows_resumed, killed.rows_written);
    let redone = 18_000 - manifest.rows_resumed.min(18_000);
    eprintln!(
        "kill after 18,000 rows: {} kept, {redone} of them written again (commit interval {interval})",
        manifest.rows_resumed
    );
    assert!(
        // Batches are cut short at the input's row-group boundaries: some slack.
        manifest.rows_resumed + interval as u64 >= 18_000 - 300,
        "{} rows kept of ~18,000 handed to the writer",
        manifest.rows_resumed
    );
    assert_eq!(manifest.rows_written, 20_000);
    assert_same_rows(
        &table_rows(&[run_dir])?,
        &reference,
        "resumed after a kill at 90%",
    );
    Ok(())
}

/// The table of an uninterrupted run of a job without models, into `dir/reference`.
fn reference_run_plain(dir: &Path, job: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let output = dir.join("reference");
    let out = run(&[
        "run",
        job.to_str().unwrap_or_default(),
        "--quiet",
        "--set",
        &format!("output.path={}", output.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    table_rows(&[only_run(&output)?])
}

/// Tickets with null and blank ids (some with the same text as each other), repeated
/// ids, killed at several exact points and stopped by SIGTERM at random ones, each time
/// resumed: every row is written exactly once, as in one uninterrupted run.
#[test]
fn rows_without_ids_and_repeated_ids_are_written_once_across_kills_and_sigterms() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut rng = Rng(0x5eed_0002);
    let rows: Vec<(Option<String>, String)> = (0..3000)
        .map(|i| {
            let draw = rng.unit();
            let id = match draw {
                d if d < 0.05 => None,
                d if d < 0.08 => Some(" ".repeat(1 + i % 3)),
                d if d < 0.13 => Some(format!("T{}", (rng.unit() * i as f64) as usize)),
                _ => Some(format!("T{i}")),
            };
            // Id-less rows share a few texts, so some are each other's duplicates.
            let text = match id.as_deref().map(str::trim) {
                None | Some("") => format!("printer offline {}", i % 300),
                _ => format!("ticket {i}: the printer is offline"),
            };
            (id, text)
        })
        .collect();
    let input = dir.path().join("tickets.parquet");
    write_raw_tickets(&input, &rows)?;
    let job = plain_job(dir.path(), &input, 100, "[run]\nbatch_size = 50\n")?;
    let job_arg = job.to_str().unwrap_or_default();
    let reference = reference_run_plain(dir.path(), &job)?;
    let failed = reference
        .iter()
        .filter(|r| r.contains("id is null") || r.contains("id is blank"))
        .count();
    assert!(failed > 80, "{failed} rows without an id kept");
    assert!(
        reference.len() < rows.len() - 100,
        "duplicates dropped: {} of {}",
        reference.len(),
        rows.len()
    );

    // kill -9 at exact points: after 7, then 23 more, then 30 more batches.
    for (i, batches) in [7, 23, 30].into_iter().enumerate() {
        let mut args = vec!["run", job_arg, "--quiet"];
        if i > 0 {
            args.push("--resume");
        }
        let out = run_failing(&format!("sink::write={batches}*off->return"), &args);
        assert!(
            !out.status.success(),
            "the process aborted after {batches} batches"
        );
    }
    let manifest = run_json(&["run", job_arg, "--resume"])?;
    assert_eq!(manifest.attempts, 4);
    assert_same_rows(
        &table_rows(&[only_run(&dir.path().join("out"))?])?,
        &reference,
        "killed three times",
    );

    // SIGTERM (once: drain; twice: at once) at random points of runs slowed to ~1.5 s.
    for sequence in 0..4 {
        let output = dir.path().join(format!("term{sequence}"));
        let set = format!("output.path={}", output.display());
        for attempt in 0.. {
            let mut args = vec!["run", job_arg, "--quiet", "--set", &set];
            if attempt > 0 {
                args.push("--resume");
            }
            let mut child = abridge()
                .args(&args)
                .env("FAILPOINTS", "sink::write=sleep(25)")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            if attempt < 3 {
                std::thread::sleep(Duration::from_millis(50 + (rng.unit() * 1400.0) as u64));
                if child.try_wait()?.is_none() {
                    let stop = [Stop::Term, Stop::TermTwice][attempt % 2];
                    stop.apply(&mut child, &output)?;
                    continue;
                }
            }
            let out = child.wait_with_output()?;
            assert!(out.status.success(), "{}", stderr(&out));
            break;
        }
        assert_same_rows(
            &table_rows(&[only_run(&output)?])?,
            &reference,
            &format!("SIGTERM sequence {sequence}"),
        );
    }

    // Ctrl-C (SIGINT) drains the same way and exits 130.
    let output = dir.path().join("int");
    let set = format!("output.path={}", output.display());
    let child = abridge()
        .args(["run", job_arg, "--set", &set])
        .env("FAILPOINTS", "sink::write=sleep(25)")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(600));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    let out = child.wait_with_output()?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT: reading no more input"), "{err}");
    let manifest = RunManifest::read(&only_run(&output)?)?;
    assert_eq!(manifest.status, RunStatus::Interrupted);
    assert!(manifest.rows_written > 0 && manifest.rows_written < reference.len() as u64);
    Ok(())
}

/// Shards and a whole run of one output exclude each other (exit 75, naming the live
/// holder); a starting shard leaves another shard's staged run folder alone.
#[test]
fn shards_and_whole_runs_exclude_each_other() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample_tickets(dir.path(), 400, 3, false)?;
    let job = plain_job(dir.path(), &input, 50, "[run]\nbatch_size = 20\n")?;
    let job_arg = job.to_str().unwrap_or_default();
    let output = dir.path().join("out");

    // Shard 1 of 2 died while staging its run folder; shard 0 starts and finishes.
    let staged = output.join(format!(".{RUN_DIR_PREFIX}night.1of2.new"));
    std::fs::create_dir_all(&staged)?;
    let out = run(&[
        "run",
        job_arg,
        "--shard",
        "0/2",
        "--run-group",
        "night",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        staged.exists(),
        "another shard's staged folder is left alone"
    );

    // While a (slowed) shard runs, a whole run is refused, and the other way round.
    let slow = |args: &[&str]| {
        abridge()
            .args(args)
            .env("FAILPOINTS", "sink::write=sleep(100)")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let lock_of = |name: &str| output.join(name);
    let wait_for = |path: &Path| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(path.exists(), "{} appears", path.display());
    };
    let mut shard = slow(&[
        "run",
        job_arg,
        "--shard",
        "1/2",
        "--run-group",
        "night",
        "--quiet",
    ])?;
    wait_for(&lock_of("_abridge.1of2.lock"));
    wait_for(&output.join(format!("{RUN_DIR_PREFIX}night.1of2")));
    let out = run(&[
        "status",
        "--output",
        output.to_str().unwrap_or_default(),
        "--json",
    ]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let live = shown
        .as_array()
        .and_then(|runs| runs.iter().find(|r| r["run_id"] == "night.1of2"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(live["state"], "running", "{shown}");
    assert!(
        live["holder"]
            .to_string()
            .contains(&format!("pid {}", shard.id())),
        "{shown}"
    );
    let out = run(&["run", job_arg, "--quiet"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("night.1of2"),
        "names the shard: {}",
        stderr(&out)
    );
    assert!(shard.try_wait()?.is_none(), "the shard is still running");
    Command::new("kill")
        .args(["-TERM", &shard.id().to_string()])
        .status()?;
    assert_eq!(shard.wait()?.code(), Some(143));

    let mut whole = slow(&["run", job_arg, "--quiet"])?;
    wait_for(&lock_of("_abridge.lock"));
    let out = run(&[
        "run",
        job_arg,
        "--shard",
        "1/2",
        "--run-group",
        "night",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("_abridge.lock") && err.contains(&format!("pid {}", whole.id())),
        "names the whole run: {err}"
    );
    whole.kill()?;
    whole.wait()?;
    Ok(())
}

/// A slow run commits by time, many small files; once its last row is in they are merged
/// (before the run is committed), also when the process dies in the middle of a merge,
/// and the index stays in step with the merged files.
#[test]
fn a_slow_runs_small_files_are_merged_at_commit_even_across_a_crash() -> TestResult {
    let dir = tempfile::tempdir()?;
    let input = sample_tickets(dir.path(), 3000, 9, false)?;
    let job = plain_job(dir.path(), &input, 1000, "[run]\nbatch_size = 50\n")?;
    let job_arg = job.to_str().unwrap_or_default();
    let reference = reference_run_plain(dir.path(), &job)?;
    let by_time = ["--set", "output.commit_every_s=0.05"];
    let data_files = |run_dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(run_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('_'))
            .collect();
        names.sort();
        names
    };

    for (name, failpoints) in [
        ("merged", "sink::write=sleep(20)"),
        (
            "crashed",
            "sink::write=sleep(20);compaction::decided=return",
        ),
    ] {
        let set = format!("output.path={}", dir.path().join(name).display());
        let mut args = vec!["run", job_arg, "--quiet", "--set", &set];
        args.extend(by_time);
        let out = run_failing(failpoints, &args);
        let run_dir = only_run(&dir.path().join(name))?;
        if name == "crashed" {
            assert!(!out.status.success(), "the process died in a merge");
            assert!(
                run_dir.join("_compaction.json").exists(),
                "{:?}",
                data_files(&run_dir)
            );
            args.push("--resume");
            let out = run(&args);
            assert!(out.status.success(), "{}", stderr(&out));
        } else {
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let manifest = RunManifest::read(&run_dir)?;
        assert_eq!(manifest.status, RunStatus::Committed);
        let files = data_files(&run_dir);
        assert!(
            files.len() <= 4 && files == manifest.files,
            "{name}: {files:?} vs the manifest's {:?}",
            manifest.files
        );
        assert_same_rows(&table_rows(&[run_dir])?, &reference, name);
    }

    // With an index: the merged files are what it records, so the next run finds it in
    // step (no rebuild) and it holds the table's tickets.
    let indexed = dir.path().join("indexed");
    std::fs::create_dir_all(&indexed)?;
    let full = full_job(&indexed, 60)?;
    let full_arg = full.to_str().unwrap_or_default();
    let reference_ids = reference_run(&indexed, &full)?.index_ids;
    let mut args = vec![
        "run",
        full_arg,
        "--quiet",
        "--set",
        "output.commit_every_rows=40",
    ];
    args.extend(by_time);
    let out = run_failing("sink::write=sleep(30)", &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["run", full_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("did not match"), "{}", stderr(&out));
    let ids = TicketIndex::open(&indexed.join("index"))?.ids()?;
    assert_eq!(ids, reference_ids);
    Ok(())
}
