//! Job files: the whole truth of a run, in TOML.
//!
//! A job file is read, `--set key=value` overrides are applied to its TOML tree, and the
//! result is checked against [`JobConfig`] (unknown keys and wrong types are errors that
//! name the key). Relative paths in the file are relative to the file's folder; relative
//! paths given with `--set` are relative to the current directory, as a user typing them
//! expects. The resolved configuration is what gets recorded beside a run's output.
//!
//! Each stage's own section (its config type, defaults and checks) lives beside the stage
//! in abridge-operators; this file holds what is about the job as a whole. Past 800 lines
//! with its tests (over a third of it), which load job files of every shape.

use std::path::{Path, PathBuf};

use abridge_operators::OperatorError;
use abridge_operators::embed::EmbedConfig;
use abridge_operators::extract::ExtractConfig;
use abridge_operators::filter::FilterConfig;
use abridge_operators::quality::MetricsConfig;
use abridge_operators::scan::InputConfig;
use abridge_operators::stage::{JobView, Stage, StageSection};
use abridge_operators::summarize::SummarizeConfig;
use serde::{Deserialize, Serialize};

/// A row of [`STAGES`]: what the job knows of a stage, and where its section sits in
/// [`JobConfig`].
#[derive(Clone, Copy)]
pub struct StageRow {
    /// Its section (`[embed]`).
    pub section: &'static str,
    /// Keys of the section holding paths ([`StageSection::PATH_KEYS`]).
    pub path_keys: &'static [&'static str],
    /// Keys left out of the results fingerprint ([`StageSection::SPEED_KEYS`]).
    pub speed_keys: &'static [&'static str],
    /// The output columns it adds ([`StageSection::COLUMNS`]).
    pub columns: &'static [&'static str],
    /// The section in a job, if the job runs the stage.
    pub stage: fn(&JobConfig) -> Option<&dyn Stage>,
    /// The section in its TOML form, for the fingerprint.
    settings: fn(&JobConfig) -> Option<toml::Value>,
}

/// A [`StageRow`] for the section type `$section`, found in a job by `$get`.
macro_rules! stage_row {
    ($section:ty, $get:expr) => {
        StageRow {
            section: <$section as StageSection>::SECTION,
            path_keys: <$section as StageSection>::PATH_KEYS,
            speed_keys: <$section as StageSection>::SPEED_KEYS,
            columns: <$section as StageSection>::COLUMNS,
            stage: |job| {
                let get: fn(&JobConfig) -> Option<&$section> = $get;
                get(job).map(|s| s as &dyn Stage)
            },
            settings: |job| {
                let get: fn(&JobConfig) -> Option<&$section> = $get;
                get(job).and_then(|s| toml::Value::try_from(s).ok())
            },
        }
    };
}

/// The job's stages in the order rows flow through them (after the input's scan and
/// normalize, the run's scope and dedup). The executor builds them in this order; the
/// results fingerprint, the keys that hold paths and the reserved output columns are
/// derived from it. A new stage is its module in abridge-operators, a field of
/// [`JobConfig`] and a line here.
pub const STAGES: [StageRow; 5] = [
    stage_row!(EmbedConfig, |job| job.embed.as_ref()),
    // With `method = "classifier"`, the topics stage after it.
    stage_row!(FilterConfig, |job| job.filter.as_ref()),
    stage_row!(SummarizeConfig, |job| job.summarize.as_ref()),
    // The summaries' vectors (for drift) and the measures, whenever summarize runs.
    stage_row!(MetricsConfig, |job| Some(&job.metrics)),
    stage_row!(ExtractConfig, |job| job.extract.as_ref()),
];

/// Everything a run needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Name and description.
    #[serde(default)]
    pub job: JobMeta,
    /// Where the tickets come from.
    pub input: InputConfig,
    /// Where the results go.
    pub output: OutputConfig,
    /// The sentence encoder stage; without this section no embeddings are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<EmbedConfig>,
    /// Which tickets go on to be summarized, by meaning; needs `[embed]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterConfig>,
    /// The job's tantivy index, for `abridge search`; needs `[embed]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexConfig>,
    /// The summarizer; without this section no summaries are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summarize: Option<SummarizeConfig>,
    /// Fields the summarizer model reads out of each kept ticket; needs `[summarize]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<ExtractConfig>,
    /// How summaries are measured (ROUGE, drift, compression, stability, alerts). The
    /// measures run whenever `[summarize]` does; this section only changes their settings.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How the executor runs the stages.
    #[serde(default)]
    pub run: RunConfig,
}

/// `[index]`: a tantivy index of every ticket with its vector, kept in step with the
/// output table (re-indexed tickets replace their old version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// The index folder (created on the first run).
    pub path: PathBuf,
}

/// `[job]`: what the job is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMeta {
    /// Shown in logs and recorded in run manifests. Default: the job file's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free text for the people who maintain the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `[output]`: the output table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Folder of the output table; each run writes its own `run_id=...` folder in it.
    pub path: PathBuf,
    /// Publish (commit) the file being written once it holds this many rows: the most
    /// rows a kill makes a resume write again, and the largest data file. Default: 5000
    /// (a 100k-ticket night is 20 files). Formerly `rows_per_file`, still accepted.
    #[serde(default = "default_commit_every_rows", alias = "rows_per_file")]
    pub commit_every_rows: usize,
    /// ... or once its first row was written this many seconds ago, whichever comes
    /// first: the most model time a kill loses on a slow run. Default: 60.
    #[serde(default = "default_commit_every_s")]
    pub commit_every_s: f64,
    /// Rows per Parquet row group; bounds the writer's memory. Default: 8192.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
}

/// `[run]`: executor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Rows per record batch read from the input. Default: 1024.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Batches buffered between two stages; with `batch_size` this bounds memory.
    /// Default: 2.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Incremental runs: skip tickets that an earlier committed run of this output table
    /// processed with the same content (`content_hash`) and the same settings for
    /// everything that decides a row's result (column mapping, encoder, filter,
    /// summarizer, metrics). A ticket whose text changed is processed again. Default:
    /// false (every run processes all of its input).
    #[serde(default)]
    pub skip_done: bool,
    /// On SIGTERM or Ctrl-C, the seconds that rows already in the stages get to finish
    /// and be published before the run stops at once (a second signal stops at once
    /// too). Default: 20, inside Kubernetes' default 30 s between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_grace_s")]
    pub stop_grace_s: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            channel_capacity: default_channel_capacity(),
            skip_done: false,
            stop_grace_s: default_stop_grace_s(),
        }
    }
}

fn default_commit_every_rows() -> usize {
    5000
}
fn default_commit_every_s() -> f64 {
    60.0
}
fn default_stop_grace_s() -> f64 {
    20.0
}
fn default_row_group_rows() -> usize {
    8192
}
fn default_batch_size() -> usize {
    1024
}
fn default_channel_capacity() -> usize {
    2
}

fn diff_values(path: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let sub = match path {
                    "" => key.clone(),
                    _ => format!("{path}.{key}"),
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff_values(&sub, x, y, out),
                    _ => out.push(sub),
                }
            }
        }
        (a, b) if a != b => out.push(path.to_string()),
        _ => {}
    }
}

/// Keys that change how a run commits, buffers and stops, never a row's result.
const OPERATIONAL_KEYS: [&str; 6] = [
    "output.commit_every_rows",
    "output.commit_every_s",
    "output.row_group_rows",
    "run.channel_capacity",
    "run.stop_grace_s",
    "summarize.stall_timeout_s",
];

/// Keys whose values are filesystem paths, resolved against the job file's folder: the
/// job's own and its stages'.
fn path_keys() -> Vec<String> {
    let own = ["input.path", "output.path", "index.path"].map(String::from);
    let stages = STAGES.iter().flat_map(|row| {
        row.path_keys
            .iter()
            .map(move |key| format!("{}.{key}", row.section))
    });
    own.into_iter().chain(stages).collect()
}

/// Column names the output's rows are written with, by abridge rather than carried from
/// the input: the table's own (`run_id`, `content_hash`, `error`) and every stage's,
/// whether or not this job runs it. An input column of one of these names is refused.
pub fn reserved_columns() -> Vec<&'static str> {
    let own = abridge_schemas::output::RESERVED.iter().copied();
    own.chain(STAGES.iter().flat_map(|row| row.columns.iter().copied()))
        .collect()
}

/// Why a job file could not be used. All of these are the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The job file cannot be read.
    #[error("cannot read job file {}: {source}", path.display())]
    Read {
        /// The job file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The job file is not valid TOML.
    #[error("job file {}: {source}", path.display())]
    Syntax {
        /// The job file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A `--set` argument is malformed or sets a key that cannot hold a value.
    #[error("--set {arg}: {reason}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key is unknown, missing, of the wrong type or out of range.
    #[error("job file {}: key `{key}`: {message}", path.display())]
    Invalid {
        /// The job file.
        path: PathBuf,
        /// The dotted key (`input.columns.text`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A model the job names cannot be read for its fingerprint.
    #[error("job file {}: key `{key}`: {source}", path.display())]
    Model {
        /// The job file.
        path: PathBuf,
        /// The dotted key that names the model.
        key: String,
        /// What could not be read.
        source: Box<OperatorError>,
    },
}

/// A loaded job: its configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Job {
    /// The resolved configuration.
    pub config: JobConfig,
    /// The job file.
    pub path: PathBuf,
    /// The `--set` overrides applied, as given.
    pub overrides: Vec<String>,
}

impl Job {
    /// Reads `path`, applies `overrides` (`key=value`), resolves relative paths and checks
    /// every key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(&text, path, overrides)
    }

    /// As [`Job::load`], with the file's text already read.
    pub fn from_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self, JobError> {
        let mut tree: toml::Table = toml::from_str(text).map_err(|source| JobError::Syntax {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        resolve_paths(&mut tree, &base);

        let cwd = std::env::current_dir().unwrap_or_default();
        let paths = path_keys();
        for arg in overrides {
            let (key, value) = parse_override(arg)?;
            let value = if paths.contains(&key) {
                match value {
                    toml::Value::String(s) => {
                        toml::Value::String(resolve_path(&cwd, &s, may_download(&tree, &key)))
                    }
                    other => other,
                }
            } else {
                value
            };
            set_key(&mut tree, &key, value).map_err(|reason| JobError::Override {
                arg: arg.clone(),
                reason,
            })?;
        }

        let config: JobConfig = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|err| JobError::Invalid {
                path: path.to_path_buf(),
                key: err.path().to_string(),
                message: err.into_inner().to_string(),
            })?;
        config
            .validate()
            .map_err(|(key, message)| JobError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        Ok(Self {
            config,
            path: path.to_path_buf(),
            overrides: overrides.to_vec(),
        })
    }

    /// The job's name: `[job].name`, or the job file's stem.
    pub fn name(&self) -> String {
        self.config.job.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "job".into())
        })
    }

    /// A digest of what decides a row's result, for `run.skip_done` and for answers learned
    /// from a committed run: the column mapping; the `[embed]`, `[filter]`, `[summarize]`,
    /// `[extract]` and `[metrics]` sections less what only changes speed (batch sizes,
    /// requests in flight, PagedAttention, the GPU's ordinal); and each model's identity
    /// (its files by content, the engine's version, the device class: see
    /// [`abridge_operators::summarize::SummarizeConfig::model_identity`]). Reads every byte
    /// of the models once per process.
    pub fn results_fingerprint(&self) -> Result<String, JobError> {
        let c = &self.config;
        let mut value = toml::Table::new();
        for (key, v) in [
            ("columns", toml::Value::try_from(&c.input.columns)),
            ("drop", toml::Value::try_from(&c.input.drop)),
        ] {
            if let Ok(v) = v {
                value.insert(key.into(), v);
            }
        }
        for row in &STAGES {
            let Some(mut settings) = (row.settings)(c) else {
                continue;
            };
            if let toml::Value::Table(t) = &mut settings {
                for key in row.speed_keys {
                    t.remove(*key);
                }
            }
            value.insert(row.section.into(), settings);
            let identity = (row.stage)(c).and_then(|stage| stage.model_identity());
            if let Some(identity) = identity {
                let identity = identity.map_err(|source| JobError::Model {
                    path: self.path.clone(),
                    key: format!("{}.model", row.section),
                    source: Box::new(source),
                })?;
                value.insert(format!("{}_identity", row.section), identity.into());
            }
        }
        let text = toml::to_string(&value).unwrap_or_default();
        Ok(blake3::hash(text.as_bytes()).to_hex()[..16].to_string())
    }

    /// The keys whose values differ between this job and `recorded` (the `_job.toml` of a
    /// run), as dotted paths; empty when they are the same job. Keys that say how a run
    /// commits and stops, not what it computes ([`OPERATIONAL_KEYS`]), are left out: a
    /// run resumed with another commit interval or grace period writes the same rows.
    pub fn differences(&self, recorded: &str) -> Vec<String> {
        record_differences(&self.to_toml(), recorded)
    }

    /// What the table protocol needs of this job ([`crate::table::RunRecord`]).
    pub fn record(&self) -> crate::table::RunRecord {
        crate::table::RunRecord {
            name: self.name(),
            overrides: self.overrides.clone(),
            output: self.config.output.path.clone(),
            job_file: self.path.clone(),
            job_text: self.to_toml(),
        }
    }

    /// The resolved configuration as TOML, every default spelled out: the record of a run.
    pub fn to_toml(&self) -> String {
        let mut out = format!(
            "# Resolved job for this run (defaults spelled out, paths absolute).\n# Source: {}\n",
            self.path.display()
        );
        for o in &self.overrides {
            out.push_str(&format!("# --set {o}\n"));
        }
        out.push_str(&toml::to_string_pretty(&self.config).unwrap_or_default());
        out
    }
}

/// [`Job::differences`] between two records of resolved jobs ([`Job::to_toml`]).
pub fn record_differences(now: &str, recorded: &str) -> Vec<String> {
    let parse = |text: &str| text.parse::<toml::Table>().map(toml::Value::Table);
    let (Ok(now), Ok(then)) = (parse(now), parse(recorded)) else {
        return vec!["(the recorded job does not parse)".into()];
    };
    let mut out = Vec::new();
    diff_values("", &now, &then, &mut out);
    out.retain(|key| !OPERATIONAL_KEYS.contains(&key.as_str()));
    out
}

impl JobConfig {
    /// Each section's own checks, then what sections require of each other.
    fn validate(&self) -> Result<(), (String, String)> {
        let section = |e: OperatorError| match e {
            OperatorError::Config { key, message } => (key, message),
            other => (String::new(), other.to_string()),
        };
        let positive = [
            ("output.commit_every_rows", self.output.commit_every_rows),
            ("output.row_group_rows", self.output.row_group_rows),
            ("run.batch_size", self.run.batch_size),
            ("run.channel_capacity", self.run.channel_capacity),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        let seconds = [
            ("output.commit_every_s", self.output.commit_every_s, 0.001),
            ("run.stop_grace_s", self.run.stop_grace_s, 0.0),
        ];
        for (key, value, least) in seconds {
            if !(value.is_finite() && value >= least && value <= 1e9) {
                return Err((
                    key.into(),
                    format!("must be a number of seconds from {least}"),
                ));
            }
        }
        self.input.validate().map_err(section)?;
        let sections = self.sections();
        let view = self.view(&sections);
        for (_, stage) in self.stages() {
            stage.validate(&view).map_err(section)?;
        }
        if self.index.is_some() && self.embed.is_none() {
            return Err((
                "index".into(),
                "needs an [embed] section: it works on the tickets' vectors".into(),
            ));
        }
        Ok(())
    }

    /// The stages the job runs, in flow order ([`STAGES`]), each with its section.
    pub fn stages(&self) -> impl Iterator<Item = (&'static StageRow, &dyn Stage)> {
        STAGES
            .iter()
            .filter_map(|row| (row.stage)(self).map(|stage| (row, stage)))
    }

    /// The sections the job has, by name.
    pub fn sections(&self) -> Vec<&'static str> {
        let mut sections = vec!["input", "output", "run"];
        sections.extend(self.stages().map(|(row, _)| row.section));
        if self.index.is_some() {
            sections.push("index");
        }
        sections
    }

    /// What a stage may know of this job ([`JobView`]); `sections` are
    /// [`JobConfig::sections`].
    pub fn view<'a>(&'a self, sections: &'a [&'static str]) -> JobView<'a> {
        JobView {
            sections,
            summarize: self.summarize.as_ref(),
            stability_samples: self.metrics.stability_samples,
        }
    }
}

fn resolve_paths(tree: &mut toml::Table, base: &Path) {
    for key in path_keys() {
        let mut parts = key.split('.');
        let (Some(section), Some(field)) = (parts.next(), parts.next()) else {
            continue;
        };
        let hub_ok = may_download(tree, &key);
        if let Some(toml::Value::String(value)) = tree
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .and_then(|s| s.get_mut(field))
        {
            *value = resolve_path(base, value, hub_ok);
        }
    }
}

/// Whether `key` may hold a hub model id rather than a path (`summarize.allow_download`).
fn may_download(tree: &toml::Table, key: &str) -> bool {
    key == "summarize.model"
        && tree
            .get("summarize")
            .and_then(|s| s.get("allow_download"))
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
}

/// `path` made absolute against `base`; a value that is no existing path stays as written
/// where a hub id is allowed.
fn resolve_path(base: &Path, path: &str, hub_ok: bool) -> String {
    let resolved = absolute(base, path);
    if hub_ok && !Path::new(&resolved).exists() {
        return path.to_string();
    }
    resolved
}

fn absolute(base: &Path, path: &str) -> String {
    let home = dirs::home_dir();
    if let (Some(rest), Some(home)) = (path.strip_prefix("~/"), home) {
        return lexically_normal(&home.join(rest)).display().to_string();
    }
    if Path::new(path).is_absolute() {
        return lexically_normal(Path::new(path)).display().to_string();
    }
    let base = if base.as_os_str().is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else if base.is_relative() {
        std::env::current_dir().unwrap_or_default().join(base)
    } else {
        base.to_path_buf()
    };
    lexically_normal(&base.join(path)).display().to_string()
}

/// Removes `.` and `..` components without touching the filesystem (the path may not
/// exist yet), so that recorded and printed paths read well.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// `key=value`: the value is read as TOML (`5`, `true`, `["a","b"]`, `"quoted"`) when it
/// parses as such, and as a plain string otherwise, so `--set input.path=x.parquet` works
/// without quotes.
fn parse_override(arg: &str) -> Result<(String, toml::Value), JobError> {
    let bad = |reason: &str| JobError::Override {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected key=value, e.g. input.path=tickets.parquet"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.trim().is_empty()) {
        return Err(bad("the key must be dotted names, e.g. output.path"));
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key.to_string(), value))
}

fn set_key(tree: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let last = parts.pop().unwrap_or_default();
    let mut table = tree;
    let mut walked = String::new();
    for part in parts {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{walked}` is a value, not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use abridge_models::Precision;
    use abridge_operators::filter::{RelativeThreshold, Threshold};
    use abridge_operators::summarize::Backend;

    const MINIMAL: &str = r#"
[input]
path = "data/t.parquet"
[output]
path = "/abs/out"
"#;

    fn load(text: &str, sets: &[&str]) -> Result<Job, JobError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Job::from_str(text, Path::new("/jobs/x.toml"), &sets)
    }

    /// What the stage table derives: the keys holding paths, and the reserved output
    /// columns, which must cover every column a stage writes (the names the output's
    /// schema held when they were listed by hand).
    #[test]
    fn the_stage_table_gives_path_keys_and_reserved_columns() {
        let mut paths = path_keys();
        paths.sort();
        let expected = [
            "embed.model",
            "index.path",
            "input.path",
            "output.path",
            "summarize.model",
        ];
        assert_eq!(paths, expected);
        let reserved = reserved_columns();
        let written = [
            "run_id",
            "content_hash",
            "error",
            "embedding",
            "embedding_cut_tokens",
            "similarity",
            "matched_query",
            "topic_score",
            "kept",
            "filter_reason",
            "summary",
            "model",
            "prompt_version",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "latency_ms",
            "glossary_missed",
            "text_cut_tokens",
            "text_cut_chars",
            "summary_samples",
            "summary_embedding",
            "summary_embedding_cut_tokens",
            "drift",
            "compression",
            "stability",
            "rouge1",
            "rouge2",
            "rouge_l",
            "alerts",
            "extracted",
            "extract_error",
        ];
        for name in written {
            assert!(reserved.contains(&name), "{name} is not reserved");
        }
        assert_eq!(reserved.len(), written.len(), "{reserved:?}");
    }

    /// The stages' speed keys leave the results fingerprint as it is; a setting that
    /// changes results, or the model's bytes, changes it.
    #[test]
    fn speed_keys_leave_the_fingerprint_and_results_keys_change_it()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("encoder"))?;
        std::fs::write(dir.path().join("encoder/model.safetensors"), b"weights")?;
        std::fs::write(dir.path().join("m.gguf"), b"gguf")?;
        let text = format!(
            "{MINIMAL}[embed]\nmodel = \"encoder\"\n\
             [summarize]\nbackend = \"llama\"\nmodel = \"m.gguf\"\n"
        );
        let path = dir.path().join("job.toml");
        let fingerprint = |sets: &[&str]| -> Result<String, JobError> {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Job::from_str(&text, &path, &sets)?.results_fingerprint()
        };
        let plain = fingerprint(&[])?;
        let speed = ["embed.batch_size=7", "summarize.in_flight=3"];
        assert_eq!(fingerprint(&speed)?, plain);
        assert_ne!(fingerprint(&["summarize.temperature=0.5"])?, plain);
        assert_ne!(fingerprint(&["embed.input={title}"])?, plain);
        std::fs::write(dir.path().join("m.gguf"), b"GGUF")?;
        assert_ne!(fingerprint(&[])?, plain, "the model's bytes");
        Ok(())
    }

    /// The shipped jobs load, and both forms of the nightly job run every stage.
    #[test]
    fn shipped_jobs_load_and_the_nightly_ones_run_every_stage() -> Result<(), JobError> {
        let jobs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs");
        for name in ["demo.toml", "nightly.toml", "nightly-gpu.toml"] {
            let job = Job::load(&jobs.join(name), &[])?;
            if name.starts_with("nightly") {
                let c = &job.config;
                let filter = c.filter.as_ref();
                assert!(
                    c.embed.is_some()
                        && filter.is_some_and(|f| f.similarity.is_some() && f.topics.is_some())
                        && c.index.is_some()
                        && c.summarize.is_some(),
                    "{name} runs every stage"
                );
            }
        }
        let gpu = Job::load(&jobs.join("nightly-gpu.toml"), &[])?;
        let summarize = gpu.config.summarize.as_ref();
        assert!(summarize.is_some_and(|s| s.device == "cuda" && s.backend == Backend::Seqgpt));
        Ok(())
    }

    #[test]
    fn defaults_and_relative_paths() -> Result<(), JobError> {
        let job = load(MINIMAL, &[])?;
        assert_eq!(job.config.input.path, "/jobs/data/t.parquet");
        let up = load(MINIMAL, &["output.path=/a/./b/../c"])?;
        assert_eq!(up.config.output.path, PathBuf::from("/a/c"));
        assert_eq!(job.config.output.path, PathBuf::from("/abs/out"));
        assert_eq!(job.config.run, RunConfig::default());
        assert_eq!(job.config.output.commit_every_rows, 5000);
        assert_eq!(job.config.output.commit_every_s, 60.0);
        assert_eq!(job.config.run.stop_grace_s, 20.0);
        assert_eq!(job.name(), "x");
        Ok(())
    }

    #[test]
    fn overrides_set_any_key_with_typed_values() -> Result<(), JobError> {
        let job = load(
            MINIMAL,
            &[
                "input.columns.text=body",
                "run.batch_size=64",
                "input.where=status = 'open'",
                "input.path=/other.parquet",
                "job.name=\"nightly\"",
            ],
        )?;
        assert_eq!(job.config.input.columns.text.as_deref(), Some("body"));
        assert_eq!(job.config.run.batch_size, 64);
        assert_eq!(
            job.config.input.where_clause.as_deref(),
            Some("status = 'open'")
        );
        assert_eq!(job.config.input.path, "/other.parquet");
        assert_eq!(job.name(), "nightly");
        Ok(())
    }

    #[test]
    fn relative_override_paths_are_relative_to_cwd() -> Result<(), JobError> {
        let job = load(MINIMAL, &["output.path=runs"])?;
        let cwd = std::env::current_dir().unwrap_or_default();
        assert_eq!(job.config.output.path, cwd.join("runs"));
        Ok(())
    }

    #[test]
    fn metrics_defaults_and_bad_values() -> Result<(), JobError> {
        let job = load(MINIMAL, &[])?;
        assert_eq!(job.config.metrics, MetricsConfig::default());
        assert_eq!(job.config.metrics.stability_samples, 1, "stability off");
        assert_eq!(job.config.metrics.alerts.drift_min, 0.45);
        let job = load(MINIMAL, &["metrics.alerts.compression_max=0.5"])?;
        assert_eq!(job.config.metrics.alerts.compression_max, 0.5);
        assert_eq!(
            job.config.metrics.alerts.compression_min, 0.12,
            "others keep defaults"
        );
        let greedy = format!("{MINIMAL}\n[summarize]\nmodel = \"m\"\ntemperature = 0.0\n");
        let msg = load(&greedy, &["metrics.stability_samples=2"])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(
            msg.contains("metrics.stability_samples") && msg.contains("temperature is 0"),
            "{msg}"
        );
        load(
            &greedy,
            &["metrics.stability_samples=2", "summarize.temperature=0.5"],
        )?;
        for (set, key) in [
            ("metrics.stability_samples=0", "metrics.stability_samples"),
            (
                "metrics.alerts.compression_min=0.9",
                "compression_min (0.9) is above",
            ),
            ("metrics.alerts.drift=0.3", "drift"),
            ("metrics.stemming=true", "stemming"),
        ] {
            let msg = load(MINIMAL, &[set])
                .map(|_| ())
                .map_err(|e| e.to_string())
                .unwrap_err();
            assert!(msg.contains(key), "{set}: {msg}");
        }
        Ok(())
    }

    #[test]
    fn summarize_defaults_presets_and_hub_ids() -> Result<(), JobError> {
        let job = load(
            &format!("{MINIMAL}\n[summarize]\nmodel = \"m/x.gguf\"\n"),
            &[],
        )?;
        let s = job.config.summarize.ok_or(JobError::Override {
            arg: String::new(),
            reason: "no [summarize]".into(),
        })?;
        assert_eq!(
            s.model, "/jobs/m/x.gguf",
            "a path, relative to the job file"
        );
        assert_eq!((s.max_new_tokens, s.max_input_tokens), (128, 512));
        assert_eq!((s.temperature, s.top_p, s.seed), (0.3, 0.9, 0));
        assert_eq!(s.in_flight(), 1, "one sequence at a time on CPU");
        assert!(s.template().contains("{text}") && s.glossary_retry);
        // SeqGPT: its own prompt format, a batch of 8 on CPU.
        let seqgpt = load(
            &format!(
                "{MINIMAL}\n[summarize]\nbackend = \"seqgpt\"\nmodel = \"seqgpt-560m\"\n\
                 prompt = \"seqgpt\"\n[summarize.seqgpt]\nlabels = [\"故障\", \"原因\"]\n"
            ),
            &[],
        )?;
        let seqgpt = seqgpt.config.summarize.ok_or(JobError::Override {
            arg: String::new(),
            reason: "no [summarize]".into(),
        })?;
        assert_eq!(
            seqgpt.template(),
            "输入: {text}\n抽取: 故障,原因\n输出: [GEN]"
        );
        assert_eq!(seqgpt.in_flight(), 8);
        let on_gpu = SummarizeConfig {
            device: "cuda".into(),
            ..seqgpt.clone()
        };
        assert_eq!(on_gpu.in_flight(), 256, "the GPU batch engine");
        // With downloads allowed, a value that is no path stays a hub id.
        let hub = load(
            &format!(
                "{MINIMAL}\n[summarize]\nmodel = \"Qwen/Qwen2.5-0.5B-Instruct\"\n\
                 allow_download = true\n"
            ),
            &[],
        )?;
        assert_eq!(
            hub.config.summarize.map(|s| s.model).as_deref(),
            Some("Qwen/Qwen2.5-0.5B-Instruct")
        );
        for (set, key) in [
            ("summarize.top_p=0", "summarize.top_p"),
            ("summarize.max_new_tokens=0", "summarize.max_new_tokens"),
            ("summarize.glossary=[\" \"]", "summarize.glossary"),
            ("summarize.device=tpu", "summarize.device"),
            ("summarize.paged_attention.block_size=12", "block_size"),
        ] {
            let msg = load(
                &format!("{MINIMAL}\n[summarize]\nmodel = \"m.gguf\"\n"),
                &[set],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
            assert!(msg.contains(key), "{set}: {msg}");
        }
        Ok(())
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(&format!("{MINIMAL}\n[run]\nbatchsize = 3\n"), &[]).map(|_| ());
        let msg = err.map_err(|e| e.to_string()).unwrap_err();
        assert!(msg.contains("run.batchsize"), "{msg}");
        assert!(msg.contains("/jobs/x.toml"), "{msg}");
    }

    #[test]
    fn unknown_mapping_key_from_override_is_named() {
        let msg = load(MINIMAL, &["input.columns.txt=body"])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("input.columns.txt"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let msg = load(MINIMAL, &["run.batch_size=lots"])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("run.batch_size"), "{msg}");
    }

    #[test]
    fn zero_is_rejected_where_it_makes_no_sense() {
        // `rows_per_file`, the key's former name, still sets it.
        for (set, key) in [
            ("output.rows_per_file=0", "output.commit_every_rows"),
            ("output.commit_every_rows=0", "output.commit_every_rows"),
            ("output.commit_every_s=0", "output.commit_every_s"),
            ("run.stop_grace_s=-1", "run.stop_grace_s"),
        ] {
            let msg = load(MINIMAL, &[set])
                .map(|_| ())
                .map_err(|e| e.to_string())
                .unwrap_err();
            assert!(msg.contains(key), "{set}: {msg}");
        }
        let job = load(MINIMAL, &["output.rows_per_file=7"]).expect("the former name");
        assert_eq!(job.config.output.commit_every_rows, 7);
        let models = format!(
            "{MINIMAL}[embed]\nmodel = \"e\"\n[summarize]\nbackend = \"llama\"\nmodel = \"m\"\n"
        );
        for (set, key) in [
            ("embed.max_batch_tokens=0", "embed.max_batch_tokens"),
            ("summarize.stall_timeout_s=-1", "summarize.stall_timeout_s"),
        ] {
            let msg = load(&models, &[set])
                .map(|_| ())
                .map_err(|e| e.to_string())
                .unwrap_err();
            assert!(msg.contains(key), "{set}: {msg}");
        }
        let job = load(&models, &[]).expect("defaults");
        let summarize = job.config.summarize.expect("[summarize]");
        assert_eq!(summarize.stall_timeout_s, 300.0);
        let embed = job.config.embed.expect("[embed]");
        assert_eq!(
            (embed.max_batch_tokens, embed.dtype),
            (None, Precision::Auto)
        );
        let half = load(&models, &["embed.dtype=bfloat16"]).expect("a dtype");
        let dtype = half.config.embed.map(|e| e.dtype);
        assert_eq!(dtype, Some(Precision::Bfloat16));
        let msg = load(&models, &["embed.dtype=float8"])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("embed.dtype"), "{msg}");
    }

    #[test]
    fn missing_section_is_named() {
        let msg = load("[input]\npath='x'\n", &[])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("output"), "{msg}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let msg = load("[input\npath='x'\n", &[])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn malformed_override_is_rejected() {
        assert!(matches!(
            load(MINIMAL, &["novalue"]),
            Err(JobError::Override { .. })
        ));
        assert!(matches!(
            load(MINIMAL, &["input.path.deeper=x"]),
            Err(JobError::Override { .. })
        ));
    }

    /// An encoder whose cosines are those of another squeezed towards 1 (c + (1 − c) ×
    /// cosine, as anisotropic encoders such as GTE give) keeps the same tickets under the
    /// default threshold: it moves with the encoder's cosine of unrelated text.
    #[test]
    fn relative_thresholds_keep_the_same_tickets_when_cosines_are_squeezed() {
        let threshold = Threshold::default();
        for c in [0.0_f32, 0.3, 0.6, 0.8] {
            let squeeze = |cosine: f32| c + (1.0 - c) * cosine;
            for unrelated in [-0.05_f32, 0.0, 0.03, 0.2] {
                for cosine in [-0.2_f32, 0.1, 0.35, 0.39, 0.4, 0.6, 0.95] {
                    let kept = cosine >= threshold.for_query(4, unrelated);
                    let squeezed = threshold.for_query(4, squeeze(unrelated));
                    // Away from the boundary, where rounding could decide either way.
                    if (squeeze(cosine) - squeezed).abs() > 1e-5 {
                        assert_eq!(
                            kept,
                            squeeze(cosine) >= squeezed,
                            "{c} {unrelated} {cosine}"
                        );
                    }
                }
            }
        }
    }

    /// The model's tasks are stages in flow order (the topics within the filter's, the
    /// summaries' vectors within the metrics'); the keys they need are checked by name; and the defaults they add leave the fingerprint of older jobs as it was.
    #[test]
    fn classifier_and_extract_stages_and_their_checks() -> Result<(), JobError> {
        let sections = |topics: &str, rest: &str| {
            format!(
                "{MINIMAL}[embed]\nmodel = \"m\"\n[filter.topics]\n{topics}\n\
                 [filter.topics.labels]\nprinting = []\nnetwork = []\n\
                 [summarize]\nbackend = \"llama\"\nmodel = \"m.gguf\"\n{rest}"
            )
        };
        let job = load(
            &sections(
                "method = \"classifier\"",
                "[extract]\nfields = [\"device\"]\n",
            ),
            &[],
        )?;
        let names: Vec<&str> = job.config.stages().map(|(row, _)| row.section).collect();
        assert_eq!(
            names,
            ["embed", "filter", "summarize", "metrics", "extract"]
        );
        let plain = load(&sections("", ""), &[])?.results_fingerprint()?;
        let explicit = load(
            &sections("method = \"prototypes\"\nmatch = \"allowed\"", ""),
            &[],
        )?;
        assert_eq!(explicit.results_fingerprint()?, plain);
        let refused = |text: &str| {
            load(text, &[])
                .map(|_| ())
                .map_err(|e| e.to_string())
                .unwrap_err()
        };
        let msg = refused(&sections("", "[extract]\nfields = []\n"));
        assert!(msg.contains("extract.fields"), "{msg}");
        let msg = refused(&sections("", "").replace("network = []", "\" \" = []"));
        assert!(
            msg.contains("filter.topics.labels") && msg.contains("spaces"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn filter_thresholds_are_relative_fixed_or_dynamic() -> Result<(), JobError> {
        let with = |threshold: &str| {
            format!(
                "{MINIMAL}[embed]\nmodel = \"m\"\n[filter.similarity]\nqueries = [\"q\"]\n{threshold}"
            )
        };
        let job = load(&with(""), &[])?;
        let similarity = job.config.filter.and_then(|f| f.similarity);
        let threshold = similarity
            .map(|s| s.threshold)
            .unwrap_or(Threshold::Fixed(0.0));
        assert_eq!(
            threshold,
            Threshold::Relative(RelativeThreshold {
                above_unrelated: 0.375
            }),
            "measured for MiniLM"
        );
        // MiniLM's unrelated cosines (~0.03) put it near the best fixed number there.
        assert!((threshold.for_query(5, 0.03) - 0.394).abs() < 1e-3);
        let job = load(&with("threshold = { above_unrelated = 0.5 }"), &[])?;
        let threshold = job
            .config
            .filter
            .and_then(|f| f.similarity)
            .map(|s| s.threshold);
        assert!(threshold.is_some_and(|t| (t.for_query(5, 0.6) - 0.8).abs() < 1e-6));
        for bad in ["1.0", "-0.1"] {
            let msg = load(
                &with(&format!("threshold = {{ above_unrelated = {bad} }}")),
                &[],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
            assert!(msg.contains("above_unrelated"), "{msg}");
        }
        let job = load(&with("threshold = 0.4"), &[])?;
        let similarity = job.config.filter.and_then(|f| f.similarity);
        assert_eq!(similarity.map(|s| s.threshold), Some(Threshold::Fixed(0.4)));
        let job = load(&with("threshold = { base = 0.5, per_token = -0.01 }"), &[])?;
        let threshold = job
            .config
            .filter
            .and_then(|f| f.similarity)
            .map(|s| s.threshold);
        assert!(threshold.is_some_and(|t| (t.for_query(10, 0.0) - 0.4).abs() < 1e-6));
        assert!(load(&with("threshold = { base = 0.5 }"), &[]).is_err());
        // The filter works on vectors: no [embed], no filter.
        let msg = load(&format!("{MINIMAL}[index]\npath = \"i\"\n"), &[])
            .map(|_| ())
            .map_err(|e| e.to_string())
            .unwrap_err();
        assert!(msg.contains("`index`") && msg.contains("[embed]"), "{msg}");
        Ok(())
    }

    #[test]
    fn resolved_job_round_trips() -> Result<(), JobError> {
        let job = load(MINIMAL, &["input.columns.id=ticket_id"])?;
        let text = job.to_toml();
        let again = Job::from_str(&text, Path::new("/elsewhere/y.toml"), &[])?;
        assert_eq!(again.config, job.config);
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            abridge_models::fuzz_cases(256)
        ))]
        /// The nightly job file with bytes changed anywhere, or cut anywhere: loading it
        /// answers (the job, or an error naming the file), and never panics.
        #[test]
        fn changed_job_files_never_panic(
            changes in proptest::collection::vec((0usize..8192, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..8192),
        ) {
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/nightly.toml");
            let bytes = abridge_models::changed_bytes(std::fs::read(shipped).expect("jobs/nightly.toml"), &changes, cut);
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("job.toml");
            std::fs::write(&path, &bytes).expect("write");
            match Job::load(&path, &[]) {
                Ok(job) => {
                    let _ = job.differences(&job.to_toml());
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains("job.toml"), "{}", e),
            }
        }
    }
}
