//! End-to-end tests with the real Qwen2.5 Coder 0.5B Instruct GGUF, which is opt-in
//! (`scripts/fetch-models qwen`, ~470 MB): where it is not cached each test says so on
//! stderr and passes without checking anything. Its parity with transformers is tested in
//! `models` (`qwen2_5_coder_matches_transformers_where_cached`, and on a random tiny Qwen2
//! always).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// The cached Qwen GGUF file, or None (and why, on stderr).
fn qwen() -> Option<PathBuf> {
    let path = abridge_models::cached_model_dir("qwen2.5-coder-0.5b-instruct")
        .join("qwen2.5-coder-0.5b-instruct.gguf");
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "skipped: {} is not cached (scripts/fetch-models qwen)",
        path.display()
    );
    None
}

/// Six English and six Chinese tickets of the demo sample.
const TICKETS: &str = "ticket_id IN (SELECT ticket_id FROM (SELECT ticket_id, language, \
    row_number() OVER (PARTITION BY language ORDER BY ticket_id) AS n FROM input) WHERE n <= 6)";

/// A row's id, language, summary and error.
type Row = (String, String, Option<String>, Option<String>);

/// The rows of a run of the demo sample's twelve tickets summarized greedily by Qwen on
/// `backend`.
fn summaries(
    dir: &Path,
    model: &Path,
    backend: &str,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let job = dir.join(format!("{backend}.toml"));
    let sample = repo().join("jobs/data/demo-tickets.parquet");
    std::fs::write(
        &job,
        format!(
            "[input]\npath = \"{}\"\n\
             [input.columns]\nid = \"ticket_id\"\ntitle = \"subject\"\ntext = \"body\"\n\
             [output]\npath = \"{}\"\n\
             [summarize]\nbackend = \"{backend}\"\nmodel = \"{}\"\nmax_new_tokens = 24\n\
             temperature = 0.0\nin_flight = 6\nprompt = \"\"\"Summarize this support ticket \
             in one short sentence. If the ticket is written in Chinese, write the summary in \
             Chinese (用中文总结). Reply with the summary only.\n\nTitle: {{title}}\n{{text}}\"\"\"\n",
            sample.display(),
            dir.join(backend).display(),
            model.display()
        ),
    )?;
    // The twelve tickets, chosen by SQL over the input, then given to the run's filter.
    let ids = abridge(&[
        "sql",
        &format!("SELECT ticket_id FROM input WHERE {TICKETS} ORDER BY ticket_id"),
        "--table",
        &format!("input={}", sample.display()),
        "--format",
        "csv",
    ]);
    assert!(ids.status.success(), "{}", stderr(&ids));
    let ids: Vec<String> = String::from_utf8(ids.stdout)?
        .lines()
        .skip(1)
        .map(|id| format!("'{id}'"))
        .collect();
    assert_eq!(ids.len(), 12);
    let filter = format!("input.where=ticket_id IN ({})", ids.join(", "));
    let out = abridge(&["run", job.to_str().unwrap_or_default(), "--set", &filter]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = abridge(&[
        "sql",
        "SELECT id, language, summary, error FROM summaries ORDER BY id",
        "--job",
        job.to_str().unwrap_or_default(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    Ok(rows
        .iter()
        .map(|r| {
            (
                text(&r["id"]).unwrap_or_default(),
                text(&r["language"]).unwrap_or_default(),
                text(&r["summary"]),
                text(&r["error"]),
            )
        })
        .collect())
}

fn chinese(text: &str) -> bool {
    text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

/// The same file on abridge's engine and on mistral.rs: every ticket summarized, in its
/// own language, and most summaries the same word for word (the engines multiply in other
/// orders and precisions, so a close pair of tokens may go either way).
#[test]
#[cfg_attr(
    not(feature = "mistralrs"),
    ignore = "needs the mistralrs feature (on by default)"
)]
fn qwen_summarizes_in_the_tickets_language_on_both_backends() -> TestResult {
    let Some(model) = qwen() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let ours = summaries(dir.path(), &model, "llama")?;
    let theirs = summaries(dir.path(), &model, "mistralrs")?;
    assert_eq!(ours.len(), 12);
    for (backend, rows) in [("llama", &ours), ("mistralrs", &theirs)] {
        for (id, _, summary, error) in rows.iter() {
            eprintln!("{backend} {id}: {summary:?} {error:?}");
        }
    }
    for (id, language, summary, error) in ours.iter().chain(&theirs) {
        assert_eq!(error, &None, "{id}");
        let summary = summary.as_deref().unwrap_or_default();
        assert!(!summary.trim().is_empty(), "{id}: no summary");
        assert_eq!(
            chinese(summary),
            language == "zh",
            "{id} ({language}): {summary}"
        );
    }
    let same = ours
        .iter()
        .zip(&theirs)
        .filter(|(a, b)| a.0 == b.0 && a.2 == b.2)
        .count();
    eprintln!("llama and mistralrs wrote the same summary for {same} of 12 tickets");
    assert!(same >= 6, "only {same} of 12 summaries agree");
    Ok(())
}
