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
use abridge_operators::summarize::{Backend, SummarizeConfig};
use serde::{Deserialize, Serialize};

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
const OPERATIONAL_KEYS: [&str; 5] = [
    "output.commit_every_rows",
    "output.commit_every_s",
    "output.row_group_rows",
    "run.channel_capacity",
    "run.stop_grace_s",
];

/// Keys whose values are filesystem paths, resolved against the job file's folder.
const PATH_KEYS: [&str; 5] = [
    "input.path",
    "output.path",
    "embed.model",
    "index.path",
    "summarize.model",
];

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
        for arg in overrides {
            let (key, value) = parse_override(arg)?;
            let value = if PATH_KEYS.contains(&key.as_str()) {
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
        let mut put = |key: &str, v: Result<toml::Value, toml::ser::Error>| {
            if let Ok(v) = v {
                value.insert(key.into(), v);
            }
        };
        put("columns", toml::Value::try_from(&c.input.columns));
        put("drop", toml::Value::try_from(&c.input.drop));
        let identity = |key: &str, id: Result<String, OperatorError>| {
            id.map_err(|source| JobError::Model {
                path: self.path.clone(),
                key: key.into(),
                source: Box::new(source),
            })
        };
        if let Some(embed) = &c.embed {
            put("embed", toml::Value::try_from(embed));
            put(
                "embed_identity",
                Ok(identity("embed.model", embed.model_identity())?.into()),
            );
        }
        if let Some(filter) = &c.filter {
            put("filter", toml::Value::try_from(filter));
        }
        if let Some(summarize) = &c.summarize {
            put("summarize", toml::Value::try_from(summarize));
            put(
                "summarize_identity",
                Ok(identity("summarize.model", summarize.model_identity())?.into()),
            );
        }
        if let Some(extract) = &c.extract {
            put("extract", toml::Value::try_from(extract));
        }
        put("metrics", toml::Value::try_from(c.metrics));
        for (section, key) in [
            ("embed", "batch_size"),
            ("embed", "device"),
            ("summarize", "device"),
            ("summarize", "in_flight"),
            ("summarize", "paged_attention"),
        ] {
            if let Some(toml::Value::Table(t)) = value.get_mut(section) {
                t.remove(key);
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
        // Both sides through the same text form, so that floats compare as written.
        let parse = |text: &str| text.parse::<toml::Table>().map(toml::Value::Table);
        let now = toml::to_string_pretty(&self.config)
            .map_err(|e| e.to_string())
            .and_then(|text| parse(&text).map_err(|e| e.to_string()));
        let (Ok(now), Ok(then)) = (now, parse(recorded)) else {
            return vec!["(the recorded job does not parse)".into()];
        };
        let mut out = Vec::new();
        diff_values("", &now, &then, &mut out);
        out.retain(|key| !OPERATIONAL_KEYS.contains(&key.as_str()));
        out
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
        if let Some(embed) = &self.embed {
            embed.validate().map_err(section)?;
        }
        if let Some(filter) = &self.filter {
            filter.validate().map_err(section)?;
        }
        let no_embed = "needs an [embed] section: it works on the tickets' vectors";
        if self.embed.is_none() {
            if self.filter.is_some() {
                return Err(("filter".into(), no_embed.into()));
            }
            if self.index.is_some() {
                return Err(("index".into(), no_embed.into()));
            }
        }
        if let Some(summarize) = &self.summarize {
            summarize.validate().map_err(section)?;
        }
        if let Some(extract) = &self.extract {
            extract.validate().map_err(section)?;
        }
        let classifier = self.filter.as_ref().is_some_and(FilterConfig::classifies);
        let asks_the_model = [
            ("filter.topics.method", classifier),
            ("extract", self.extract.is_some()),
        ];
        for (key, asks) in asks_the_model {
            if asks && self.summarize.is_none() {
                let message = "asks the summarizer model: add a [summarize] section";
                return Err((key.into(), message.into()));
            }
        }
        if classifier
            && self
                .summarize
                .as_ref()
                .is_some_and(|s| s.backend == Backend::Mistralrs)
        {
            return Err((
                "filter.topics.method".into(),
                "`classifier` restricts decoding to the labels' tokens, which abridge's own \
                 engine does: set summarize.backend to `llama` (Llama or Qwen2 GGUF) or `seqgpt` \
                 (BLOOM, SeqGPT-560M)"
                    .into(),
            ));
        }
        self.metrics.validate().map_err(section)?;
        let samples = self.metrics.stability_samples;
        if samples > 1
            && self
                .summarize
                .as_ref()
                .is_some_and(|s| s.temperature == 0.0)
        {
            return Err((
                "metrics.stability_samples".into(),
                format!(
                    "is {samples}, but summarize.temperature is 0: greedy decoding draws the \
                     same summary every time, so stability would be 0 for {samples}x the work; \
                     raise the temperature or set stability_samples = 1"
                ),
            ));
        }
        Ok(())
    }

    /// The stages after the input's (scan and normalize) in the order rows flow through
    /// them, each with the section that configures it: what the executor builds.
    pub fn stages(&self) -> Vec<StageConfig<'_>> {
        let mut stages = vec![StageConfig::Scope(&self.run), StageConfig::Dedup];
        if let Some(embed) = &self.embed {
            stages.push(StageConfig::Embed(embed));
            if let Some(filter) = &self.filter {
                stages.push(StageConfig::Filter(filter));
                if let Some(summarize) = self.summarize.as_ref().filter(|_| filter.classifies()) {
                    stages.push(StageConfig::Topics(filter, summarize));
                }
            }
            if let Some(index) = &self.index {
                stages.push(StageConfig::Index(index, embed));
            }
        }
        if let Some(summarize) = &self.summarize {
            stages.push(StageConfig::Summarize(summarize, &self.metrics));
            if self.embed.is_some() {
                stages.push(StageConfig::EmbedSummaries);
            }
            stages.push(StageConfig::Metrics(&self.metrics));
            if let Some(extract) = &self.extract {
                stages.push(StageConfig::Extract(extract, summarize));
            }
        }
        stages
    }
}

/// A stage of a job and the section it is built from ([`JobConfig::stages`]).
#[derive(Debug, Clone, Copy)]
pub enum StageConfig<'a> {
    /// This shard's rows, less those done by earlier runs (`run.skip_done`).
    Scope(&'a RunConfig),
    /// Repeated ids and rows a resumed run committed, dropped.
    Dedup,
    /// The tickets' vectors; the encoder serves the stages after it too.
    Embed(&'a EmbedConfig),
    Filter(&'a FilterConfig),
    /// The topics of the filter's kept tickets by the `[summarize]` model
    /// (`[filter.topics] method = "classifier"`).
    Topics(&'a FilterConfig, &'a SummarizeConfig),
    /// Not a stream stage: the index the sink commits with each published file, with
    /// the encoder's section (the index records which encoder made its vectors).
    Index(&'a IndexConfig, &'a EmbedConfig),
    /// With `[metrics]` for `stability_samples`.
    Summarize(&'a SummarizeConfig, &'a MetricsConfig),
    /// The summaries' vectors, by the `embed` encoder, for `drift`.
    EmbedSummaries,
    Metrics(&'a MetricsConfig),
    /// With `[summarize]`, whose model answers.
    Extract(&'a ExtractConfig, &'a SummarizeConfig),
}

fn resolve_paths(tree: &mut toml::Table, base: &Path) {
    for key in PATH_KEYS {
        let mut parts = key.split('.');
        let (Some(section), Some(field)) = (parts.next(), parts.next()) else {
            continue;
        };
        let hub_ok = may_download(tree, key);
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

    /// The model's tasks are stages in flow order; the keys they need are checked by
    /// name; and the defaults they add leave the fingerprint of older jobs as it was.
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
        let names: Vec<String> = job
            .config
            .stages()
            .iter()
            .map(|s| {
                format!("{s:?}")
                    .split('(')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "Scope",
                "Dedup",
                "Embed",
                "Filter",
                "Topics",
                "Summarize",
                "EmbedSummaries",
                "Metrics",
                "Extract"
            ]
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
