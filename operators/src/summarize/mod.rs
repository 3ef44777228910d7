//! `summarize`: one summary per kept ticket, from any [`Generator`].
//!
//! Per row: the text is cut to a token budget (its head is kept; what was left out is
//! counted in `text_cut_tokens` and `text_cut_chars`, the rest of the row is kept as
//! is), the prompt template is filled in, the generator answers, and the answer is
//! cleaned (echoed prompt and template anchors trimmed, then the job's rewrite rules in
//! order). Glossary terms that were in the text but not in the summary are reported per
//! row, after one optional retry that names them in the prompt.
//!
//! Rows that failed before, or that the filter did not keep, pass through with null
//! summary columns. A row the generator fails on keeps its reason in `error`; the rest of
//! the batch goes on. Rows leave in the order they came, whatever order answers arrive in.

mod config;

use std::sync::Arc;
use std::time::Duration;

use abridge_schemas::TicketColumn;
use abridge_schemas::output::ERROR;
use arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Builder, Int64Builder, ListBuilder, StringArray,
    StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use futures::future::BoxFuture;
use regex::Regex;

use crate::filter::KEPT;
use crate::template::Template;
use crate::{AsyncBatchTransform, AsyncTransformStage, OperatorError, StageCounters};

use abridge_models::generator::{
    Generation, GenerationRequest, GeneratorError, Head, Sampling, SharedGenerator,
};
pub use config::{
    Backend, PRESETS, RuleConfig, SeqGptPromptConfig, SummarizeConfig, preset, seqgpt_template,
};

/// Column: the cleaned summary.
pub const SUMMARY: &str = "summary";
/// Column: the generator's model (path or id).
pub const MODEL: &str = "model";
/// Column: hash of the template and every setting that shapes a summary.
pub const PROMPT_VERSION: &str = "prompt_version";
/// Column: tokens of the prompt as the model saw it (chat template included).
pub const PROMPT_TOKENS: &str = "prompt_tokens";
/// Column: tokens generated.
pub const COMPLETION_TOKENS: &str = "completion_tokens";
/// Column: why the summary ended: `stop` (the model ended it), `length` (it used all of
/// `max_new_tokens`), or `repetition` (it ran into a loop, cut to one occurrence).
pub const FINISH_REASON: &str = "finish_reason";
/// Column: milliseconds the engine spent on the row (its retry included), queueing not.
pub const LATENCY_MS: &str = "latency_ms";
/// Column: glossary terms in the text that the summary lost.
pub const GLOSSARY_MISSED: &str = "glossary_missed";
/// Column: tokens of `text` past `max_input_tokens`, left out of the prompt (0: none).
pub const TEXT_CUT_TOKENS: &str = "text_cut_tokens";
/// Column: characters of `text` left out of the prompt, so that `compression` can be
/// measured against the text the model saw.
pub const TEXT_CUT_CHARS: &str = "text_cut_chars";
/// Column (when `samples` > 1): the other sampled summaries of the row, for `stability`.
pub const SUMMARY_SAMPLES: &str = "summary_samples";

/// Every column the stage writes (`summary_samples` with stability samples only).
pub const COLUMNS: [&str; 11] = [
    SUMMARY,
    MODEL,
    PROMPT_VERSION,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    FINISH_REASON,
    LATENCY_MS,
    GLOSSARY_MISSED,
    TEXT_CUT_TOKENS,
    TEXT_CUT_CHARS,
    SUMMARY_SAMPLES,
];

/// One post-processing rule: every match of `pattern` becomes `replacement` (`$1` and
/// `${name}` refer to capture groups).
#[derive(Debug, Clone)]
pub struct Rewrite {
    pattern: Regex,
    replacement: String,
}

impl Rewrite {
    /// A rule; an invalid pattern is an error naming it.
    pub fn new(pattern: &str, replacement: &str) -> Result<Self, OperatorError> {
        let compiled = Regex::new(pattern).map_err(|e| OperatorError::Rule {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            pattern: compiled,
            replacement: replacement.to_string(),
        })
    }
}

/// What shapes the summaries (the job's `[summarize]` less the model).
#[derive(Debug, Clone)]
pub struct SummarizeSettings {
    /// Must use `{text}`; may use any input column.
    pub template: String,
    pub sampling: Sampling,
    /// Tokens of `text` the prompt may hold.
    pub max_input_tokens: usize,
    /// Terms that must survive verbatim.
    pub glossary: Vec<String>,
    /// Ask once more, naming the lost terms, when a summary loses any.
    pub glossary_retry: bool,
    /// Applied in order to every summary.
    pub rules: Vec<Rewrite>,
    /// Requests kept open at the generator.
    pub in_flight: usize,
    /// Summaries drawn per row: the first is `summary`, the others go to
    /// `summary_samples` (1: no such column). Each draw has its own random stream.
    pub samples: usize,
}

impl SummarizeSettings {
    /// The `prompt_version` these settings write: a hash of everything that changes
    /// what a summary says (template, sampling, input budget, glossary, rules).
    pub fn version(&self) -> String {
        prompt_version(self)
    }
}

/// The `summarize` stage.
pub struct Summarize {
    generator: SharedGenerator,
    settings: SummarizeSettings,
    template: Template,
    prompt_version: String,
    text: usize,
    schema: SchemaRef,
}

impl Summarize {
    /// A `summarize` stage over streams of `input`; a template without `{text}` or naming
    /// a missing column is refused here, before any row.
    pub fn try_new(
        generator: SharedGenerator,
        settings: SummarizeSettings,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<Self>, OperatorError> {
        let template = Template::parse(&settings.template, input)?;
        let text = input
            .index_of(TicketColumn::Text.name())
            .map_err(|_| OperatorError::StageSchema("summarize needs a `text` column".into()))?;
        if !template.uses(text) {
            return Err(OperatorError::Template {
                template: settings.template.clone(),
                reason: "does not use {text}, the ticket to summarize".into(),
            });
        }
        for name in COLUMNS {
            if input.index_of(name).is_ok() {
                return Err(OperatorError::StageSchema(format!(
                    "the input already has a `{name}` column, which summarize writes"
                )));
            }
        }
        let mut fields: Vec<_> = input.fields().iter().cloned().collect();
        fields.extend(output_fields(settings.samples).into_iter().map(Arc::new));
        let schema = Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()));
        let stage = Self {
            prompt_version: prompt_version(&settings),
            generator,
            settings,
            template,
            text,
            schema,
        };
        Ok(AsyncTransformStage::new("summarize", stage))
    }

    /// The `prompt_version` this stage writes.
    pub fn prompt_version(&self) -> &str {
        &self.prompt_version
    }
}

fn output_fields(samples: usize) -> Vec<Field> {
    let text_list = || DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let mut fields = vec![
        Field::new(SUMMARY, DataType::Utf8, true),
        Field::new(MODEL, DataType::Utf8, true),
        Field::new(PROMPT_VERSION, DataType::Utf8, true),
        Field::new(PROMPT_TOKENS, DataType::Int32, true),
        Field::new(COMPLETION_TOKENS, DataType::Int32, true),
        Field::new(FINISH_REASON, DataType::Utf8, true),
        Field::new(LATENCY_MS, DataType::Int64, true),
        Field::new(GLOSSARY_MISSED, text_list(), true),
        Field::new(TEXT_CUT_TOKENS, DataType::Int32, true),
        Field::new(TEXT_CUT_CHARS, DataType::Int32, true),
    ];
    if samples > 1 {
        fields.push(Field::new(SUMMARY_SAMPLES, text_list(), true));
    }
    fields
}

/// Hash of everything in the settings that changes what a summary says (not how fast).
fn prompt_version(settings: &SummarizeSettings) -> String {
    let s = &settings.sampling;
    let mut hasher = blake3::Hasher::new();
    let mut field = |value: &str| {
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    };
    field(&settings.template);
    field(&format!(
        "t={} p={} max={} seed={} input={} retry={}",
        s.temperature,
        s.top_p,
        s.max_new_tokens,
        s.seed,
        settings.max_input_tokens,
        settings.glossary_retry
    ));
    for term in &settings.glossary {
        field(term);
    }
    for rule in &settings.rules {
        field(rule.pattern.as_str());
        field(&rule.replacement);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// A batch's rows go to the generator with the stage's window of requests in flight
/// (in a run, and for SQL's `summarize()`).
impl AsyncBatchTransform for Summarize {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform<'a>(
        &'a self,
        batch: RecordBatch,
        metrics: &'a StageCounters,
    ) -> BoxFuture<'a, Result<RecordBatch, OperatorError>> {
        Box::pin(self.summarize_batch(batch, metrics))
    }
}

/// What became of one row.
enum Outcome {
    Skipped,
    Failed(String),
    /// The model answered, but nothing was left of it once cleaned: a failed row that
    /// still records the tokens and time the answer took.
    Empty(Summary),
    Done(Summary),
}

struct Summary {
    text: String,
    /// The row's other draws (cleaned; empty ones and failed requests left out).
    samples: Vec<String>,
    missed: Vec<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish: &'static str,
    latency: Duration,
}

impl Summarize {
    async fn summarize_batch(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let rows = batch.num_rows();
        let errors = batch.column_by_name(ERROR);
        let kept = batch
            .column_by_name(KEPT)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>());
        let todo: Vec<usize> = (0..rows)
            .filter(|&r| errors.is_none_or(|e| e.is_null(r)))
            .filter(|&r| kept.is_none_or(|k| k.is_valid(r) && k.value(r)))
            .collect();
        let texts = cast(batch.column(self.text), &DataType::Utf8)?;
        let texts = texts
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| OperatorError::StageSchema("`text` is not text".into()))?;
        let ids = batch
            .column_by_name(TicketColumn::Id.name())
            .map(|c| cast(c, &DataType::Utf8))
            .transpose()?;
        let ids = ids
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());

        // The text each prompt holds: its head, within the token budget. (Futures are
        // collected first: a lazy iterator of closures held across an await trips the
        // compiler's lifetime inference for `Send` streams.)
        let budget = self.settings.max_input_tokens;
        let window = self.settings.in_flight.max(1);
        let mut cuts: Vec<BoxFuture<'_, Result<Head, GeneratorError>>> = Vec::new();
        for &r in &todo {
            let text = if texts.is_valid(r) {
                texts.value(r)
            } else {
                ""
            };
            cuts.push(self.generator.truncate(text.to_string(), budget));
        }
        let heads: Vec<_> = futures::stream::iter(cuts).buffered(window).collect().await;
        let mut head_texts: Vec<Option<String>> = vec![None; rows];
        let mut left_out: Vec<Option<LeftOut>> = vec![None; rows];
        let mut outcomes: Vec<Outcome> = (0..rows).map(|_| Outcome::Skipped).collect();
        for (&r, head) in todo.iter().zip(heads) {
            match head {
                Ok(head) => {
                    let whole = if texts.is_valid(r) {
                        texts.value(r)
                    } else {
                        ""
                    };
                    left_out[r] = Some(LeftOut {
                        tokens: head.cut_tokens,
                        chars: whole
                            .chars()
                            .count()
                            .saturating_sub(head.text.chars().count()),
                    });
                    head_texts[r] = Some(head.text);
                }
                Err(e) => outcomes[r] = Outcome::Failed(format!("summarize: {e}")),
            }
        }
        let ready: Vec<bool> = head_texts.iter().map(Option::is_some).collect();
        let mut columns = batch.columns().to_vec();
        columns[self.text] = Arc::new(StringArray::from(head_texts.clone()));
        let with_heads = RecordBatch::try_new(batch.schema(), columns)?;
        let prompts = self.template.render(&with_heads, &ready)?;

        let mut jobs: Vec<BoxFuture<'_, (usize, Outcome)>> = Vec::new();
        let ready_rows = (0..rows).filter(|&r| ready[r]);
        for (row, prompt) in ready_rows.zip(prompts) {
            let id = ids
                .filter(|ids| ids.is_valid(row))
                .map(|ids| ids.value(row));
            let key = row_key(id, row);
            let source = head_texts[row].take().unwrap_or_default();
            jobs.push(Box::pin(async move {
                (row, self.summarize_row(prompt, key, &source).await)
            }));
        }
        let answers: Vec<_> = futures::stream::iter(jobs).buffered(window).collect().await;
        for (row, outcome) in answers {
            outcomes[row] = outcome;
        }
        self.assemble(&batch, outcomes, &left_out, metrics)
    }

    async fn summarize_row(&self, prompt: String, key: u64, source: &str) -> Outcome {
        fail::fail_point!("summarize::generate", |_| Outcome::Failed(
            "summarize: injected generator error (failpoint summarize::generate)".into()
        ));
        let request = |prompt: String| GenerationRequest {
            prompt,
            sampling: self.settings.sampling.clone(),
            key,
        };
        let first = match self.generator.generate(request(prompt.clone())).await {
            Ok(g) => g,
            Err(e) => return Outcome::Failed(format!("summarize: {e}")),
        };
        let mut best = self.finish(first, &prompt, source);
        let mut latency = best.latency;
        if self.settings.glossary_retry && !best.missed.is_empty() {
            let retry = format!(
                "{prompt}\n\nKeep these terms exactly as written: {}.",
                best.missed.join(", ")
            );
            // A failed retry leaves the first answer standing.
            if let Ok(second) = self.generator.generate(request(retry.clone())).await {
                latency += second.latency;
                let second = self.finish(second, &retry, source);
                if second.missed.len() <= best.missed.len() && !second.text.is_empty() {
                    best = second;
                }
            }
        }
        best.latency = latency;
        if best.text.is_empty() {
            return Outcome::Empty(best);
        }
        let draws = (1..self.settings.samples).map(|draw| {
            // Another random stream for the same row (and the same one in every run).
            let key = key ^ (draw as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let request = GenerationRequest {
                key,
                ..request(prompt.clone())
            };
            async move { self.generator.generate(request).await }
        });
        for draw in futures::future::join_all(draws).await.into_iter().flatten() {
            let text = self.finish(draw, &prompt, source).text;
            if !text.is_empty() {
                best.samples.push(text);
            }
        }
        Outcome::Done(best)
    }

    fn finish(&self, generation: Generation, prompt: &str, source: &str) -> Summary {
        let text = clean(
            &generation.text,
            prompt,
            self.template.literals(),
            &self.settings.rules,
        );
        let (text, finish) = match cut_repetition(&text) {
            Some(cut) => (cut, "repetition"),
            None if generation.completion_tokens >= self.settings.sampling.max_new_tokens => {
                (text, "length")
            }
            None => (text, "stop"),
        };
        Summary {
            finish,
            samples: Vec::new(),
            missed: glossary_missed(&self.settings.glossary, source, &text),
            text,
            prompt_tokens: generation.prompt_tokens,
            completion_tokens: generation.completion_tokens,
            latency: generation.latency,
        }
    }

    fn assemble(
        &self,
        batch: &RecordBatch,
        outcomes: Vec<Outcome>,
        left_out: &[Option<LeftOut>],
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let old_errors = batch
            .column_by_name(ERROR)
            .map(|c| cast(c, &DataType::Utf8))
            .transpose()?;
        let old_errors = old_errors
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let mut error = StringBuilder::new();
        let mut summary = StringBuilder::new();
        let mut model = StringBuilder::new();
        let mut version = StringBuilder::new();
        let mut prompt_tokens = Int32Builder::new();
        let mut completion_tokens = Int32Builder::new();
        let mut finish = StringBuilder::new();
        let mut latency = Int64Builder::new();
        let mut missed = ListBuilder::new(StringBuilder::new());
        let mut samples = ListBuilder::new(StringBuilder::new());
        let mut cut_tokens = Int32Builder::new();
        let mut cut_chars = Int32Builder::new();
        for cut in left_out {
            cut_tokens.append_option(cut.map(|c| clamp_i32(c.tokens)));
            cut_chars.append_option(cut.map(|c| clamp_i32(c.chars)));
        }
        let mut failed = 0;
        for (row, outcome) in outcomes.into_iter().enumerate() {
            let old = old_errors.filter(|e| e.is_valid(row)).map(|e| e.value(row));
            let ran = !matches!(outcome, Outcome::Skipped);
            let (done, spent) = match outcome {
                Outcome::Done(s) => {
                    error.append_option(old);
                    (true, Some(s))
                }
                Outcome::Empty(s) => {
                    failed += 1;
                    error.append_value("summarize: the model returned an empty summary");
                    (false, Some(s))
                }
                Outcome::Failed(reason) => {
                    failed += 1;
                    error.append_value(reason);
                    (false, None)
                }
                Outcome::Skipped => {
                    error.append_option(old);
                    (false, None)
                }
            };
            model.append_option(ran.then(|| self.generator.model()));
            version.append_option(ran.then_some(&self.prompt_version));
            match spent.as_ref().filter(|_| done) {
                Some(s) => {
                    summary.append_value(&s.text);
                    for term in &s.missed {
                        missed.values().append_value(term);
                    }
                    missed.append(true);
                    for sample in &s.samples {
                        samples.values().append_value(sample);
                    }
                    samples.append(true);
                }
                None => {
                    summary.append_null();
                    missed.append(false);
                    samples.append(false);
                }
            }
            match spent {
                Some(s) => {
                    prompt_tokens.append_value(clamp_i32(s.prompt_tokens));
                    completion_tokens.append_value(clamp_i32(s.completion_tokens));
                    finish.append_value(s.finish);
                    latency.append_value(s.latency.as_millis().min(i64::MAX as u128) as i64);
                }
                None => {
                    prompt_tokens.append_null();
                    completion_tokens.append_null();
                    finish.append_null();
                    latency.append_null();
                }
            }
        }
        metrics.add_failed(failed);
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        match batch.schema().index_of(ERROR) {
            Ok(i) => columns[i] = Arc::new(error.finish()),
            Err(_) => {
                return Err(OperatorError::StageSchema(
                    "summarize needs the `error` column normalize adds".into(),
                ));
            }
        }
        columns.extend([
            Arc::new(summary.finish()) as ArrayRef,
            Arc::new(model.finish()),
            Arc::new(version.finish()),
            Arc::new(prompt_tokens.finish()),
            Arc::new(completion_tokens.finish()),
            Arc::new(finish.finish()),
            Arc::new(latency.finish()),
            Arc::new(missed.finish()),
            Arc::new(cut_tokens.finish()),
            Arc::new(cut_chars.finish()),
        ]);
        if self.settings.samples > 1 {
            columns.push(Arc::new(samples.finish()));
        }
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

/// Repeats of one unit at the end of a text that make it a runaway loop.
const LOOP_REPEATS: usize = 4;
/// Longest unit looked for, in characters.
const LOOP_UNIT: usize = 32;
/// Shortest looping tail worth cutting, in characters (so `!!!!` or `...` stay).
const LOOP_CHARS: usize = 12;

/// The text with a loop at its end cut to one occurrence of the loop's unit, or `None`
/// when it has none. Small models under greedy decoding fall into such loops and fill
/// the token budget with them; the repeats say nothing. A loop is the shortest unit (up
/// to [`LOOP_UNIT`] characters) repeated at least [`LOOP_REPEATS`] times in a row up to
/// the end (the last repeat may be partial), over at least [`LOOP_CHARS`] characters.
fn cut_repetition(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    for unit in 1..=LOOP_UNIT.min(n / LOOP_REPEATS) {
        // The periodic tail: from `start` on, every char equals the one a unit before.
        let mut start = n;
        while start > unit && chars[start - 1] == chars[start - 1 - unit] {
            start -= 1;
        }
        let start = start - unit;
        let tail = n - start;
        if tail >= LOOP_CHARS && tail / unit >= LOOP_REPEATS {
            let kept: String = chars[..start + unit].iter().collect();
            return Some(kept.trim_end().to_string());
        }
    }
    None
}

/// What a prompt left out of a row's text.
#[derive(Debug, Clone, Copy)]
struct LeftOut {
    tokens: usize,
    chars: usize,
}

fn clamp_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A stable key for a row's random draws: its id, or its position when it has none.
fn row_key(id: Option<&str>, row: usize) -> u64 {
    match id {
        Some(id) => {
            let hash = blake3::hash(id.as_bytes());
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&hash.as_bytes()[..8]);
            u64::from_le_bytes(bytes)
        }
        None => row as u64,
    }
}

/// The summary without what the model echoed: the prompt itself, and the template's
/// literal parts (anchors like `【摘要】`) at either end; then the rewrite rules.
fn clean<'a>(
    raw: &str,
    prompt: &str,
    literals: impl Iterator<Item = &'a str>,
    rules: &[Rewrite],
) -> String {
    let mut text = raw.trim();
    let prompt = prompt.trim();
    let literals: Vec<&str> = literals
        .map(str::trim)
        .filter(|l| l.chars().count() >= 2)
        .collect();
    loop {
        let before = text.len();
        if !prompt.is_empty() {
            text = text.strip_prefix(prompt).unwrap_or(text).trim();
        }
        for literal in &literals {
            text = text.strip_prefix(literal).unwrap_or(text).trim();
            text = text.strip_suffix(literal).unwrap_or(text).trim();
        }
        if text.len() == before {
            break;
        }
    }
    let mut text = text.to_string();
    for rule in rules {
        text = rule
            .pattern
            .replace_all(&text, rule.replacement.as_str())
            .into_owned();
    }
    text.trim().to_string()
}

/// Glossary terms present in `source` but absent from `summary`, in glossary order.
fn glossary_missed(glossary: &[String], source: &str, summary: &str) -> Vec<String> {
    glossary
        .iter()
        .filter(|term| source.contains(term.as_str()) && !summary.contains(term.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(pattern: &str, replacement: &str) -> Rewrite {
        Rewrite::new(pattern, replacement).unwrap()
    }

    #[test]
    fn cleaning_trims_echoes_and_anchors_then_applies_rules_in_order() {
        let literals = ["【摘要】", "【/摘要】"];
        assert_eq!(
            clean(
                "  【摘要】营收增长1.2倍【/摘要】 ",
                "x",
                literals.into_iter(),
                &[]
            ),
            "营收增长1.2倍"
        );
        let rules = [
            rule(r"增长(\d+)\.(\d)倍", "增长${1}${2}0%"),
            rule("120%", "120%!"),
        ];
        assert_eq!(
            clean("营收增长1.2倍", "x", literals.into_iter(), &rules),
            "营收增长120%!"
        );
        let prompt = "Summarize: printer jams";
        assert_eq!(
            clean(
                "Summarize: printer jams\nThe printer jams.",
                prompt,
                [].into_iter(),
                &[]
            ),
            "The printer jams."
        );
        // Single characters are not anchors: "." must survive.
        assert_eq!(clean("Done.", "x", ["."].into_iter(), &[]), "Done.");
    }

    #[test]
    fn runaway_loops_are_cut_to_one_occurrence() {
        let cut = |t: &str| cut_repetition(t);
        assert_eq!(cut("fifififififififi").as_deref(), Some("fi"));
        assert_eq!(
            cut("Printer offline. Printer offline. Printer offline. Printer offline. Prin")
                .as_deref(),
            Some("Printer offline.")
        );
        assert_eq!(
            cut("打印机离线打印机离线打印机离线打印机离线").as_deref(),
            Some("打印机离线")
        );
        for fine in [
            "",
            "The printer is offline again!!!!",
            "VPN drops; reset the token...",
            "ha ha ha",
            "Printer offline. Printer offline. Printer offline.",
        ] {
            assert_eq!(cut(fine), None, "{fine}");
        }
    }

    #[test]
    fn invalid_rules_name_the_pattern() {
        let err = Rewrite::new("(unclosed", "").unwrap_err().to_string();
        assert!(err.contains("(unclosed"), "{err}");
    }

    #[test]
    fn glossary_reports_only_terms_the_source_had() {
        let glossary = vec!["Transformer".to_string(), "VPN".into(), "SAP".into()];
        assert_eq!(
            glossary_missed(&glossary, "The Transformer and the VPN", "the vpn is down"),
            vec!["Transformer", "VPN"]
        );
        assert!(glossary_missed(&glossary, "VPN down", "VPN down").is_empty());
    }

    #[test]
    fn versions_follow_settings() {
        let settings = SummarizeSettings {
            template: "{text}".into(),
            sampling: Sampling {
                temperature: 0.3,
                top_p: 0.9,
                max_new_tokens: 64,
                seed: 1,
            },
            max_input_tokens: 512,
            glossary: vec![],
            glossary_retry: true,
            rules: vec![],
            in_flight: 4,
            samples: 1,
        };
        let mut other = settings.clone();
        other.in_flight = 8;
        assert_eq!(prompt_version(&settings), prompt_version(&other));
        other.sampling.seed = 2;
        assert_ne!(prompt_version(&settings), prompt_version(&other));
        let mut rules = settings.clone();
        rules.rules = vec![rule("a", "b")];
        assert_ne!(prompt_version(&settings), prompt_version(&rules));
    }

    proptest! {
        #[test]
        fn cleaning_is_idempotent_without_rules(raw in "\\PC{0,40}", prompt in "\\PC{0,10}") {
            let once = clean(&raw, &prompt, ["【摘要】"].into_iter(), &[]);
            let twice = clean(&once, &prompt, ["【摘要】"].into_iter(), &[]);
            prop_assert_eq!(once, twice);
        }
    }
}
