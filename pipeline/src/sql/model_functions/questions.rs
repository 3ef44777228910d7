//! `classify(text, labels)` and `extract_fields(text, 'a, b')`: SeqGPT's tasks, asked of
//! the summarizer's model as the run's topics and extract stages ask them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use abridge_operators::summarize::SummarizeConfig;
use abridge_operators::tasks::{self};
use arrow::array::{Array, AsArray, ListArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::error::Result;

use super::{Models, Results, lock, stand_in_text};
use crate::sql::result_cache::{Answer, Key, key};

/// What [`Models::ask_each`] asks about: the question, the inputs, the rows of them
/// asked, and each row's key.
struct Asking<'a> {
    question: Question,
    texts: &'a StringArray,
    group: &'a [usize],
    keys: &'a [Key],
}

/// A task of [`abridge_operators::tasks`], with what it asks for.
enum Question {
    Classify(Arc<[String]>),
    Extract(Arc<[String]>),
}

impl Question {
    /// The SQL function that asks it, for error messages.
    fn function(&self) -> &'static str {
        match self {
            Question::Classify(_) => "classify",
            Question::Extract(_) => "extract_fields",
        }
    }
}

impl Models {
    pub(super) async fn classify(
        &self,
        texts: &StringArray,
        labels: &ListArray,
        counting: bool,
    ) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let (config, fingerprint) = self.generator_model("classify")?;
        // Rows by label set.
        let mut groups: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
        for row in (0..rows).filter(|&r| texts.is_valid(r) && labels.is_valid(r)) {
            let values = cast(&labels.value(row), &DataType::Utf8)?;
            let set: Vec<String> = values
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string)
                .collect();
            groups.entry(set).or_default().push(row);
        }
        let seqgpt = config.task_settings().seqgpt;
        for (set, group) in groups {
            if set.is_empty() {
                for &row in &group {
                    results.errors[row] = Some("classify: no labels".into());
                }
                continue;
            }
            // Keyed by the very question asked, so that a changed prompt asks again.
            let max_input = format!("max_input={}", config.max_input_tokens);
            let keys: Vec<Key> = group
                .iter()
                .map(|&r| {
                    let question = tasks::classification_prompt(texts.value(r), &set, seqgpt);
                    key(&["classify", &fingerprint, &max_input, &question])
                })
                .collect();
            let todo = self.look_up(&group, &keys, &mut results, counting, &|k| {
                Answer::Text(stand_in_text(k))
            });
            if todo.is_empty() {
                continue;
            }
            let asked = Asking {
                question: Question::Classify(set.into()),
                texts,
                group: &group,
                keys: &keys,
            };
            self.ask_each(config, asked, &todo, &mut results).await?;
        }
        Ok(results)
    }

    pub(super) async fn extract(
        &self,
        texts: &StringArray,
        names: &[String],
        counting: bool,
    ) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let (config, fingerprint) = self.generator_model("extract_fields")?;
        let seqgpt = config.task_settings().seqgpt;
        // "form": answers are filled-in forms where the engine can constrain decoding. Keyed
        // by the very question asked, so that a changed prompt asks again.
        let style = format!(
            "form max_input={} max_new={}",
            config.max_input_tokens, config.max_new_tokens
        );
        let group: Vec<usize> = (0..rows).filter(|&r| texts.is_valid(r)).collect();
        let keys: Vec<Key> = group
            .iter()
            .map(|&r| {
                let question = tasks::extraction_prompt(texts.value(r), names, seqgpt);
                key(&["extract", &fingerprint, &style, &question])
            })
            .collect();
        // A form whose every value is distinct, so that calls over a field are counted.
        let form = |k: &Key| {
            let value = stand_in_text(k);
            let lines: Vec<String> = names.iter().map(|n| format!("{n}: {value}")).collect();
            Answer::Text(lines.join("\n"))
        };
        let todo = self.look_up(&group, &keys, &mut results, counting, &form);
        if !todo.is_empty() {
            let asked = Asking {
                question: Question::Extract(names.into()),
                texts,
                group: &group,
                keys: &keys,
            };
            self.ask_each(config, asked, &todo, &mut results).await?;
        }
        // Answers, new or cached, are parsed strictly: one that does not parse is the row's
        // error (the raw answer stays cached; parsing it again gives the same error).
        let mut failed = Vec::new();
        for row in 0..rows {
            if let Some(Answer::Text(raw)) = &results.values[row]
                && let Err(reason) = tasks::parse_fields(raw, names)
            {
                failed.push(format!("extract_fields: {reason} (answer: {raw:?})"));
                results.errors[row] = failed.last().cloned();
                results.values[row] = None;
            }
        }
        if !counting && !failed.is_empty() {
            let mut accounting = lock(&self.accounting);
            accounting.failed += failed.len() as u64;
            accounting
                .first_error
                .get_or_insert_with(|| failed[0].clone());
        }
        Ok(results)
    }

    /// Asks the generator `asked.question` about each input of `todo` (indices into
    /// `asked.group`), as a run's stages do ([`abridge_operators::tasks`]); the answers are
    /// recorded as [`Models::record`] does, their tokens and time in the accounting.
    async fn ask_each(
        &self,
        config: &SummarizeConfig,
        asked: Asking<'_>,
        todo: &[(usize, Key)],
        results: &mut Results,
    ) -> Result<()> {
        let generator = self.generator().await?;
        let settings = config.task_settings();
        let texts: Vec<String> = todo
            .iter()
            .map(|&(i, _)| asked.texts.value(asked.group[i]).to_string())
            .collect();
        let function = asked.question.function();
        let started = Instant::now();
        let answers = match asked.question {
            Question::Classify(labels) => {
                tasks::classify_each(&generator, texts, labels, &settings).await
            }
            Question::Extract(names) => {
                tasks::extract_each(&generator, texts, names, &settings).await
            }
        };
        let elapsed = started.elapsed();
        let mut tokens = (0, 0);
        let answers = todo
            .iter()
            .zip(answers)
            .map(|(&(_, k), a)| match a {
                Ok(g) => {
                    tokens.0 += g.prompt_tokens as u64;
                    tokens.1 += g.completion_tokens as u64;
                    Ok((k, Answer::Text(g.text)))
                }
                Err(e) => Err(format!("{function}: {e}")),
            })
            .collect();
        self.record(asked.group, asked.keys, todo, answers, results);
        let mut accounting = lock(&self.accounting);
        accounting.prompt_tokens += tokens.0;
        accounting.completion_tokens += tokens.1;
        accounting.model_ms += elapsed.as_millis() as u64;
        Ok(())
    }
}
