//! End-to-end tests of the model functions of `abridge sql` (`summarize`, `embed` and their
//! `try_` forms): the real binary, real Parquet, real small models (the tiny BLOOM
//! checkpoint for the batch engine, MiniLM for vectors).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray};

mod common;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binary with its cache (and so the model answers it keeps) in `cache`.
fn abridge(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_abridge"))
        .args(args)
        .env("ABRIDGE_CACHE", cache)
        .current_dir(repo())
        .output()
        .expect("the abridge binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sql` over the table `NAME=PATH` under `--max-model-rows max`.
fn limited(cache: &Path, sql: &str, job: &str, table: &str, max: &str) -> Output {
    let args = [
        "sql",
        sql,
        "--job",
        job,
        "--table",
        table,
        "--max-model-rows",
        max,
    ];
    abridge(cache, &args)
}

/// A query's rows (`--format json`) and its model accounting (the `models:` log event).
fn query(
    cache: &Path,
    job: &Path,
    sql: &str,
    extra: &[&str],
) -> Result<(Vec<serde_json::Value>, serde_json::Value), Box<dyn std::error::Error>> {
    let mut args = vec![
        "--log-format",
        "json",
        "sql",
        sql,
        "--job",
        job.to_str().unwrap_or_default(),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = abridge(cache, &args);
    assert!(out.status.success(), "{sql}: {}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok((rows, accounting(&out)))
}

/// The fields of the `models:` event on stderr (null when the query called no model).
fn accounting(out: &Output) -> serde_json::Value {
    stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e.get("model_calls").is_some())
        .unwrap_or_default()
}

fn write_texts(path: &Path, texts: &[String]) -> TestResult {
    write_texts_in_groups(path, texts, 1 << 20)
}

/// [`write_texts`] in row groups of `rows`, so that a scan reads several batches.
fn write_texts_in_groups(path: &Path, texts: &[String], rows: usize) -> TestResult {
    let ids: Vec<String> = (0..texts.len()).map(|i| format!("R{i}")).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(StringArray::from(ids)) as Arc<dyn Array>),
        ("text", Arc::new(StringArray::from(texts.to_vec()))),
    ])?;
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows))
        .build();
    let file = std::fs::File::create(path)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

/// A job whose only model is the tiny BLOOM on the batch engine (`in_flight` 8, greedy).
fn bloom_job(dir: &Path) -> std::io::Result<PathBuf> {
    bloom_job_over(dir, &repo().join("tests/fixtures/bloom-tiny-4h"))
}

/// [`bloom_job`] over the BLOOM checkpoint at `model`.
fn bloom_job_over(dir: &Path, model: &Path) -> std::io::Result<PathBuf> {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[summarize]\nbackend = \"seqgpt\"\n\
             model = \"{}\"\nprompt = \"seqgpt\"\nmax_new_tokens = 4\ntemperature = 0\n\
             glossary_retry = false\nin_flight = 8\n",
            dir.join("t.parquet").display(),
            dir.join("out").display(),
            model.display()
        ),
    )?;
    Ok(job)
}

const IN_FLIGHT: u64 = 8;
const MAX_NEW: u64 = 4;

#[test]
fn summarize_batches_caches_guards_and_fails_per_row() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..200)
        .map(|i| format!("Ticket {i}: the printer on floor {} is offline", i % 7))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = bloom_job(dir.path())?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    let sql = "SELECT id, summarize(text) AS s FROM t ORDER BY id";

    // The guard counts without calling: 200 inputs, more than 50, refused by count.
    let out = abridge(
        &cache,
        &[
            "sql",
            sql,
            "--job",
            job.to_str().unwrap_or_default(),
            "--table",
            &table,
            "--max-model-rows",
            "50",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("200 inputs"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--max-model-rows 50"),
        "{}",
        stderr(&out)
    );

    // Batched: the engine's decoding steps are those of ceil(200 / in_flight) waves of
    // in_flight sequences or fewer (one row at a time would take 200 × (MAX_NEW - 1)).
    let (first, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(first.len(), 200);
    assert!(first.iter().all(|r| r["s"].is_string()), "{first:?}");
    assert_eq!(calls["model_calls"], 200, "{calls}");
    assert_eq!(calls["cache_hits"], 0, "{calls}");
    let steps = calls["engine_steps"].as_u64().ok_or("engine_steps")?;
    assert!(
        (1..=200u64.div_ceil(IN_FLIGHT) * MAX_NEW).contains(&steps),
        "{steps} steps: {calls}"
    );
    assert!(calls["prompt_tokens"].as_u64() > Some(200), "{calls}");

    // Asked again: every row from the cache, no model call, the same answers.
    let (second, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(second, first);
    assert_eq!(
        (calls["model_calls"].as_u64(), calls["cache_hits"].as_u64()),
        (Some(0), Some(200))
    );
    // The guard counts only what the cache cannot answer.
    query(
        &cache,
        &job,
        sql,
        &["--table", &table, "--max-model-rows", "1"],
    )?;
    // Without the cache, every row calls the model again, with the same (greedy) answers.
    let (third, calls) = query(&cache, &job, sql, &["--table", &table, "--no-cache"])?;
    assert_eq!(third, first);
    assert_eq!(calls["model_calls"], 200, "{calls}");

    // A row that fails (its prompt does not use {text}) is NULL with its reason; the
    // others are answered. With --fail-on-error the query fails instead.
    let failing = "SELECT id, try_summarize(text, CASE WHEN id = 'R3' THEN 'no placeholder' \
                   ELSE 'seqgpt' END) AS r FROM t WHERE id IN ('R1', 'R3') ORDER BY id";
    let (rows, calls) = query(&cache, &job, failing, &["--table", &table])?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["r"]["result"], first[1]["s"], "{rows:?}");
    assert!(rows[0]["r"]["error"].is_null(), "{rows:?}");
    assert!(rows[1]["r"]["result"].is_null(), "{rows:?}");
    let reason = rows[1]["r"]["error"].as_str().unwrap_or_default();
    assert!(reason.contains("{text}"), "{rows:?}");
    assert_eq!(calls["failed"], 1, "{calls}");
    let out = abridge(
        &cache,
        &[
            "sql",
            &failing.replace("try_summarize", "summarize"),
            "--job",
            job.to_str().unwrap_or_default(),
            "--table",
            &table,
            "--fail-on-error",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--fail-on-error"), "{}", stderr(&out));
    Ok(())
}

/// Answers are reused by what the model is, not where it lies: once its weights change in
/// place (same path, size and modification time), neither the committed run's summaries
/// nor the cache answer for it.
#[test]
fn weights_changed_in_place_are_asked_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..6)
        .map(|i| format!("Ticket {i}: the scanner on floor {i} jams"))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let model = common::own_bloom(dir.path())?;
    let job = bloom_job_over(dir.path(), &model)?;
    let out = abridge(
        &cache,
        &["run", job.to_str().unwrap_or_default(), "--quiet"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let sql = "SELECT id, summarize(text) AS s FROM summaries ORDER BY id";
    let calls_and_hits =
        |calls: &serde_json::Value| (calls["model_calls"].as_u64(), calls["cache_hits"].as_u64());

    let (_, calls) = query(&cache, &job, sql, &[])?;
    assert_eq!(
        calls_and_hits(&calls),
        (Some(0), Some(6)),
        "the run's answers"
    );
    common::change_weights_in_place(&model)?;
    let (_, calls) = query(&cache, &job, sql, &[])?;
    assert_eq!(calls_and_hits(&calls), (Some(6), Some(0)), "other weights");
    let (_, calls) = query(&cache, &job, sql, &[])?;
    assert_eq!(
        calls_and_hits(&calls),
        (Some(0), Some(6)),
        "their answers, cached"
    );
    Ok(())
}

/// `ORDER BY ... LIMIT n` over a model call sends n rows to the model, not the table: the
/// sort runs before the calls it does not depend on, and its results are those of the
/// subquery that sorts and limits first.
#[test]
fn a_sort_and_limit_reach_below_the_model_calls() -> TestResult {
    let dir = tempfile::tempdir()?;
    let texts: Vec<String> = (0..60)
        .map(|i| format!("Ticket {i}: the VPN drops every {} minutes", i % 9 + 1))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = bloom_job(dir.path())?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    let cache = |name: &str| dir.path().join(name);
    let (sorted, calls) = query(
        &cache("a"),
        &job,
        "SELECT id, summarize(text) AS s, length(text) AS n FROM t ORDER BY n DESC, id LIMIT 5",
        &["--table", &table],
    )?;
    assert_eq!(calls["model_calls"], 5, "{calls}");
    // Written as Parquet, the result carries its accounting in its metadata.
    let file = dir.path().join("sorted.parquet");
    let out = abridge(
        &cache("d"),
        &[
            "sql",
            "SELECT id, summarize(text) AS s FROM t ORDER BY id LIMIT 3",
            "--job",
            job.to_str().unwrap_or_default(),
            "--table",
            &table,
            "--format",
            "parquet",
            "--out",
            file.to_str().unwrap_or_default(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&file)?,
    )?;
    let metadata = reader
        .schema()
        .metadata()
        .get("abridge.model_accounting")
        .cloned();
    let written: serde_json::Value = serde_json::from_str(&metadata.unwrap_or_default())?;
    assert_eq!(written["model_calls"], 3, "{written}");
    let (first, _) = query(
        &cache("b"),
        &job,
        "SELECT id, summarize(text) AS s, length(text) AS n FROM \
         (SELECT * FROM t ORDER BY length(text) DESC, id LIMIT 5)",
        &["--table", &table],
    )?;
    assert_eq!(sorted, first);
    // Sorting by the model's answer needs every answer: all 60 rows go to the model.
    let (_, calls) = query(
        &cache("c"),
        &job,
        "SELECT id, summarize(text) AS s FROM t ORDER BY s LIMIT 5",
        &["--table", &table],
    )?;
    assert_eq!(calls["model_calls"], 60, "{calls}");

    // A computed sort key is computed once: the rows come sorted by the value shown.
    let (rows, calls) = query(
        &cache("e"),
        &job,
        "SELECT id, summarize(text) AS s, rouge_l(text, 'VPN drops every 7 minutes') AS r \
         FROM t ORDER BY r DESC, id LIMIT 4",
        &["--table", &table],
    )?;
    assert_eq!(calls["model_calls"], 4, "{calls}");
    let scores: Vec<f64> = rows.iter().filter_map(|r| r["r"].as_f64()).collect();
    assert_eq!(scores.len(), 4, "{rows:?}");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{rows:?}");
    // A volatile key keeps the plan as written: shown once, the rows sorted by it.
    let (rows, _) = query(
        &cache("f"),
        &job,
        "SELECT id, summarize(text) AS s, random() AS r FROM t ORDER BY r LIMIT 4",
        &["--table", &table],
    )?;
    let drawn: Vec<f64> = rows.iter().filter_map(|r| r["r"].as_f64()).collect();
    assert_eq!(drawn.len(), 4, "{rows:?}");
    assert!(drawn.windows(2).all(|w| w[0] <= w[1]), "{rows:?}");
    Ok(())
}

/// A job with the tiny BLOOM as summarizer and MiniLM as encoder.
fn bloom_and_minilm_job(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let job = bloom_job(dir)?;
    let mut text = std::fs::read_to_string(&job)?;
    text.push_str(&format!(
        "[embed]\nmodel = \"{}\"\n",
        abridge_models::cached_model_dir("minilm-l6-v2").display()
    ));
    std::fs::write(&job, text)?;
    Ok(job)
}

/// Calls over other calls' answers run, and the guard counts them: `embed(summarize(t))`
/// over N rows is 2N calls; a filter on a model's answer is counted as if every row
/// passed it; a question asked in several batches is asked once, cache or not.
#[test]
fn nested_calls_run_and_the_guard_bounds_every_call() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..12)
        .map(|i| format!("Ticket {i}: the badge reader at door {i} beeps"))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = bloom_and_minilm_job(dir.path())?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    let job_arg = job.to_str().unwrap_or_default();
    let refused = |sql: &str, max: &str| {
        let out = limited(&cache, sql, job_arg, &table, max);
        (out.status.code(), stderr(&out))
    };

    let nested = "SELECT id, embed(summarize(text)) AS e FROM t ORDER BY id LIMIT 6";
    let (code, message) = refused(nested, "11");
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("12 inputs"), "{message}");
    let (rows, calls) = query(
        &cache,
        &job,
        nested,
        &["--table", &table, "--max-model-rows", "12"],
    )?;
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter()
            .all(|r| r["e"].as_array().is_some_and(|v| v.len() == 384)),
        "{rows:?}"
    );
    // The guard counted every summary as a new text (at most 12 calls); the query
    // embedded each distinct summary once.
    let (distinct, _) = query(
        &cache,
        &job,
        "SELECT count(DISTINCT s) AS n FROM \
         (SELECT summarize(text) AS s FROM (SELECT * FROM t ORDER BY id LIMIT 6))",
        &["--table", &table],
    )?;
    let distinct = distinct[0]["n"].as_u64().ok_or("a count")?;
    assert_eq!(calls["model_calls"].as_u64(), Some(6 + distinct), "{calls}");
    // The summaries' vectors are those of the summaries asked alone.
    let (alone, _) = query(
        &cache,
        &job,
        "SELECT id, embed(s) AS e FROM (SELECT id, summarize(text) AS s FROM t) ORDER BY id LIMIT 6",
        &["--table", &table],
    )?;
    assert_eq!(alone, rows);

    // Whatever the classifier answers, the summaries after it are at most 12.
    let filtered = "SELECT id, summarize(concat('Filtered: ', text)) AS s FROM t \
                    WHERE classify(text, ['doors', 'printers']) = 'doors' LIMIT 3";
    let (code, message) = refused(filtered, "23");
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("24 inputs"), "{message}");

    // Which rows meet in a join on a model's answer is known only once it has answered.
    let joined = "SELECT summarize(b.text) AS s FROM (SELECT id, classify(text, ['doors', \
                  'printers']) AS c FROM t) a JOIN t b ON a.c = b.text";
    let (code, message) = refused(joined, "100");
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("join on a model's answer"), "{message}");

    // 400 rows of 4 texts, read in batches of 50: 4 calls without the cache.
    let repeated: Vec<String> = (0..400)
        .map(|i| format!("Repeated ticket {}", i % 4))
        .collect();
    let file = dir.path().join("r.parquet");
    write_texts_in_groups(&file, &repeated, 50)?;
    let table = format!("r={}", file.display());
    let (rows, calls) = query(
        &cache,
        &job,
        "SELECT summarize(text) AS s FROM r",
        &["--table", &table, "--no-cache", "--max-model-rows", "4"],
    )?;
    assert_eq!(rows.len(), 400);
    assert_eq!(calls["model_calls"], 4, "{calls}");
    Ok(())
}

#[test]
fn classify_answers_only_listed_labels_batched_and_cached() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..60)
        .map(|i| match i % 3 {
            0 => format!("printer {i} is offline"),
            1 => format!("邮箱已满 {i}"),
            _ => format!("VPN drops every {i} minutes"),
        })
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = bloom_job(dir.path())?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    let sql = "SELECT id, classify(text, ['printing', 'print', 'email', '网络']) AS c FROM t \
               ORDER BY id";
    let (rows, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(rows.len(), 60);
    for r in &rows {
        let c = r["c"].as_str().unwrap_or_default();
        assert!(["printing", "print", "email", "网络"].contains(&c), "{r}");
    }
    assert_eq!(calls["model_calls"], 60, "{calls}");
    // A label is a few tokens: the batch engine decodes them for in_flight rows at once.
    let steps = calls["engine_steps"].as_u64().ok_or("engine_steps")?;
    assert!(
        steps <= 60u64.div_ceil(IN_FLIGHT) * 4,
        "{steps} steps: {calls}"
    );
    let (again, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(again, rows);
    assert_eq!(calls["cache_hits"], 60, "{calls}");
    // Grouped by the answer, as written: the counts of the answers above.
    let (groups, _) = query(
        &cache,
        &job,
        "SELECT classify(text, ['printing', 'print', 'email', '网络']) AS c, count(*) AS n \
         FROM t GROUP BY c ORDER BY c",
        &["--table", &table],
    )?;
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for r in &rows {
        *counts
            .entry(r["c"].as_str().unwrap_or_default().into())
            .or_default() += 1;
    }
    let grouped: std::collections::BTreeMap<String, u64> = groups
        .iter()
        .map(|g| {
            (
                g["c"].as_str().unwrap_or_default().into(),
                g["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(grouped, counts);
    Ok(())
}

#[test]
fn extract_fields_gives_a_struct_of_the_fields_or_the_rows_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..12)
        .map(|i| format!("printer {i} on floor {} is offline", i % 4))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = bloom_job(dir.path())?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    // abridge's engine fills the form in (it writes each `name:`, the model the value):
    // the tiny BLOOM's values are noise, but every row has both fields, each a line of
    // at most max_new_tokens tokens or NULL.
    let sql = "SELECT id, try_extract_fields(text, 'device, floor') AS r FROM t ORDER BY id";
    let (rows, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert!(r["r"]["error"].is_null(), "{r}");
        let result = r["r"]["result"].as_object().ok_or("a struct")?;
        assert_eq!(result.len(), 2, "{r}");
        for value in result.values() {
            assert!(
                value.is_null() || value.as_str().is_some_and(|v| !v.contains('\n')),
                "{r}"
            );
        }
    }
    assert_eq!(
        (calls["model_calls"].as_u64(), calls["failed"].as_u64()),
        (Some(12), Some(0))
    );
    let (again, calls) = query(&cache, &job, sql, &["--table", &table])?;
    assert_eq!(again, rows);
    assert_eq!(calls["cache_hits"], 12, "{calls}");

    // mistral.rs cannot constrain decoding: SmolLM2 answers freely and never in the
    // format, so each row is NULL with the reason and the raw answer, never a guess.
    let smollm2 = dir.path().join("smollm2.toml");
    std::fs::write(
        &smollm2,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[summarize]\n\
             backend = \"mistralrs\"\nmodel = \"{}\"\nmax_new_tokens = 12\ntemperature = 0\n",
            dir.path().join("t.parquet").display(),
            dir.path().join("out").display(),
            abridge_models::cached_model_dir("smollm2-135m-instruct").display()
        ),
    )?;
    let (free, calls) = query(
        &cache,
        &smollm2,
        "SELECT id, try_extract_fields(text, 'device, floor') AS r FROM t LIMIT 3",
        &["--table", &table],
    )?;
    assert_eq!(free.len(), 3);
    for r in &free {
        assert!(r["r"]["result"].is_null(), "{r}");
        let error = r["r"]["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("extract_fields: ") && error.contains("answer: "),
            "{r}"
        );
    }
    assert_eq!(calls["failed"].as_u64(), Some(3), "{calls}");
    // The struct's fields are the names the query gives; they must be a literal.
    let (fields, _) = query(
        &cache,
        &job,
        "SELECT id, extract_fields(text, 'device,floor')['floor'] AS floor FROM t ORDER BY id",
        &["--table", &table],
    )?;
    let floors: Vec<_> = fields.iter().map(|r| &r["floor"]).collect();
    let earlier: Vec<_> = rows.iter().map(|r| &r["r"]["result"]["floor"]).collect();
    assert_eq!(floors, earlier);
    let out = abridge(
        &cache,
        &[
            "sql",
            "SELECT extract_fields(text, text) FROM t",
            "--job",
            job.to_str().unwrap_or_default(),
            "--table",
            &table,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a text written in the query"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// A job that embeds `rows` sample tickets with MiniLM ("{title}\n{text}"), nothing else.
fn embed_job(dir: &Path, rows: usize) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let input = dir.join("tickets.parquet");
    let out = abridge(
        &dir.join("cache"),
        &[
            "sample",
            "--rows",
            &rows.to_string(),
            "--seed",
            "3",
            "--clean",
            "--out",
            input.to_str().unwrap_or_default(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[input.columns]\nid = \"ticket_id\"\ntitle = \"subject\"\n\
             text = \"body\"\n[output]\npath = \"{}\"\n[embed]\nmodel = \"{}\"\n\
             input = \"{{title}}\\n{{text}}\"\n",
            input.display(),
            dir.join("out").display(),
            abridge_models::cached_model_dir("minilm-l6-v2").display()
        ),
    )?;
    let out = abridge(
        &dir.join("cache"),
        &["run", job.to_str().unwrap_or_default(), "--quiet"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(job)
}

#[test]
fn embed_equals_the_runs_vectors_and_the_committed_run_answers_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let job = embed_job(dir.path(), 30)?;
    // The text the job embedded, asked in SQL: the committed run answers every row.
    let same = "SELECT count(*) AS n, min(cosine(embed(concat(title, chr(10), text)), embedding)) \
                AS worst FROM summaries";
    let (rows, calls) = query(&cache, &job, same, &[])?;
    assert_eq!(rows[0]["n"], 30);
    assert!(rows[0]["worst"].as_f64() > Some(0.99999), "{rows:?}");
    assert_eq!(
        (calls["model_calls"].as_u64(), calls["cache_hits"].as_u64()),
        (Some(0), Some(30))
    );
    // Without the cache the encoder runs, and its vectors are the run's.
    let (rows, calls) = query(&cache, &job, same, &["--no-cache"])?;
    assert!(rows[0]["worst"].as_f64() > Some(0.9999), "{rows:?}");
    assert_eq!(calls["model_calls"], 30, "{calls}");
    // A search by meaning in SQL: one model call for the literal, whatever the rows.
    let search = "SELECT title, cosine(embed('the printer is offline'), embedding) AS score \
                  FROM summaries ORDER BY score DESC LIMIT 3";
    let (rows, calls) = query(&cache, &job, search, &[])?;
    assert_eq!(rows.len(), 3);
    assert_eq!(calls["model_calls"], 1, "{calls}");
    let (_, calls) = query(&cache, &job, search, &[])?;
    assert_eq!(calls["model_calls"], 0, "{calls}");
    // Sorting by a call: computed in a projection below the sort, as in the subquery form.
    let (by_call, _) = query(
        &cache,
        &job,
        "SELECT id FROM summaries ORDER BY cosine(embed('x'), embedding) DESC, id LIMIT 3",
        &[],
    )?;
    let (by_column, _) = query(
        &cache,
        &job,
        "SELECT id FROM (SELECT id, cosine(embed('x'), embedding) AS s FROM summaries) \
         ORDER BY s DESC, id LIMIT 3",
        &[],
    )?;
    assert_eq!(by_call, by_column);
    // Where DataFusion cannot evaluate an async function at all: a clear error, exit 2,
    // with the way out.
    let out = abridge(
        &cache,
        &[
            "sql",
            "SELECT count(*) FROM summaries GROUP BY ROLLUP (cosine(embed('x'), embedding))",
            "--job",
            job.to_str().unwrap_or_default(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("subquery"), "{}", stderr(&out));
    // try_embed's vector has the run's dimension.
    let (rows, _) = query(
        &cache,
        &job,
        "SELECT array_length(try_embed('x')['result']) AS dim",
        &[],
    )?;
    assert_eq!(rows[0]["dim"], 384, "{rows:?}");
    Ok(())
}

/// Ctrl-C stops a query with exit 130, and the answers of the parts it had finished are
/// kept: asked again, only the rest goes to the model. `abridge cache` shows them.
#[test]
fn an_interrupted_query_keeps_its_answers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let texts: Vec<String> = (0..64)
        .map(|i| format!("Ticket {i}: the laptop in room {i} does not boot after the update"))
        .collect();
    write_texts(&dir.path().join("t.parquet"), &texts)?;
    let job = dir.path().join("job.toml");
    // SmolLM2 on the batch engine, two requests at a time: answers are kept every 8 rows.
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n[output]\npath = \"{}\"\n[summarize]\nbackend = \"llama\"\n\
             model = \"{}\"\nmax_new_tokens = 24\ntemperature = 0\nglossary_retry = false\n\
             in_flight = 2\n",
            dir.path().join("t.parquet").display(),
            dir.path().join("out").display(),
            abridge_models::cached_model_dir("smollm2-135m-instruct").display()
        ),
    )?;
    let table = format!("t={}", dir.path().join("t.parquet").display());
    let sql = "SELECT id, summarize(text) AS s FROM t";
    let job_arg = job.to_str().unwrap_or_default();
    let child = Command::new(env!("CARGO_BIN_EXE_abridge"))
        .args(["sql", sql, "--job", job_arg, "--table", &table])
        .env("ABRIDGE_CACHE", &cache)
        .current_dir(repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let answers = cache.join("sql-results");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&answers).map_or(0, |d| d.count()) == 0 {
        assert!(
            started.elapsed().as_secs() < 300,
            "no answers kept after 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()?
            .success()
    );
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGINT"),
        "{}",
        stderr(&out)
    );

    // Counted again: the kept answers are not asked for.
    let out = limited(&cache, sql, job_arg, &table, "1");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let left: usize = stderr(&out)
        .split_whitespace()
        .zip(stderr(&out).split_whitespace().skip(1))
        .find(|(_, next)| next.starts_with("inputs"))
        .and_then(|(n, _)| n.parse().ok())
        .ok_or_else(|| format!("no count in {}", stderr(&out)))?;
    assert!(
        (1..=56).contains(&left),
        "{left} inputs left: {}",
        stderr(&out)
    );

    let out = abridge(&cache, &["cache", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        summary["answers"].as_u64(),
        Some(64 - left as u64),
        "{summary}"
    );
    assert_eq!(summary["queries"], 1, "{summary}");
    let out = abridge(&cache, &["cache", "--clear"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = abridge(&cache, &["cache", "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["answers"], 0, "{summary}");
    Ok(())
}
