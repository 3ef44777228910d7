//! SeqGPT's two trained tasks besides summaries, asked of the summarizer model:
//! classification (分类) and extraction (抽取). Their prompts, the strict reading of an
//! extraction's answer, and the asking of many texts at once, shared by the filter's
//! classifier, the `extract` stage and SQL's `classify()` / `extract_fields()`, so that a
//! query and a run ask the same question the same way.

use std::sync::Arc;

use abridge_models::generator::{Generation, GeneratorError, SharedGenerator};
use arrow::array::{ArrayRef, StringArray, StructArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::Fields;
use arrow::error::ArrowError;
use futures::StreamExt;
use futures::future::BoxFuture;

/// How the summarizer model is asked these tasks: from the job's `[summarize]`
/// ([`crate::summarize::SummarizeConfig::task_settings`]).
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// SeqGPT's own prompts (`输入: …\n分类: a,b\n输出: [GEN]`) rather than English
    /// instructions: the `seqgpt` backend's model was trained on them, chat models were not.
    pub seqgpt: bool,
    /// Tokens of a text a prompt holds (its head).
    pub max_input_tokens: usize,
    /// Most tokens of each extracted value.
    pub max_new_tokens: usize,
    /// Requests kept open at the engine.
    pub in_flight: usize,
}

/// The classification question: SeqGPT's prompt (分类, the task it was trained on) or an
/// instruction for chat models.
pub fn classification_prompt(text: &str, labels: &[String], seqgpt: bool) -> String {
    match seqgpt {
        true => format!("输入: {text}\n分类: {}\n输出: [GEN]", labels.join(",")),
        false => format!(
            "Classify the text into exactly one of these categories: {}. Reply with the \
             category only.\n\nText: {text}\n\nCategory:",
            labels.join(", ")
        ),
    }
}

/// The extraction question: SeqGPT's prompt (抽取) or an instruction for chat models; both
/// answer one `field: value` line per field.
pub fn extraction_prompt(text: &str, names: &[String], seqgpt: bool) -> String {
    match seqgpt {
        true => format!("输入: {text}\n抽取: {}\n输出: [GEN]", names.join(",")),
        false => format!(
            "Extract these fields from the text: {}. Answer with exactly one line per field, \
             `field: value`, and `field: none` when the text does not say.\n\nText: {text}",
            names.join(", ")
        ),
    }
}

/// Why `names` cannot be asked for: the answer is read as `name: value` lines, so a name
/// must be one distinct word or phrase without separators.
pub fn check_field_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("names no field".into());
    }
    for (i, name) in names.iter().enumerate() {
        if name.trim().is_empty() {
            return Err("has an empty field name".into());
        }
        if name.trim() != name {
            return Err(format!("field {name:?} has leading or trailing spaces"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| [',', '，', ':', '：', '\n', '\r'].contains(c))
        {
            return Err(format!(
                "field {name:?} has {c:?}, which separates fields or values"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("names field {name:?} twice"));
        }
    }
    Ok(())
}

/// The values of an extraction answer, one line `name: value` per field (a full-width
/// colon too, as SeqGPT writes Chinese), in `names`' order; `none` (or 无, or nothing)
/// is a NULL value. Strict: a line for a name not asked for, a field twice or a field
/// missing makes the whole answer an error, never a guess.
pub fn parse_fields(raw: &str, names: &[String]) -> Result<Vec<Option<String>>, String> {
    let mut values: Vec<Option<Option<String>>> = vec![None; names.len()];
    for line in raw.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once([':', '：']) else {
            return Err(format!("the line {line:?} is not `field: value`"));
        };
        let name = name.trim();
        let Some(at) = names.iter().position(|n| n == name) else {
            return Err(format!(
                "the answer names `{name}`, which was not asked for"
            ));
        };
        if values[at].is_some() {
            return Err(format!("the answer gives `{name}` twice"));
        }
        let value = value.trim();
        let none = value.is_empty()
            || ["none", "null", "n/a", "无"].contains(&value.to_lowercase().as_str());
        values[at] = Some((!none).then(|| value.to_string()));
    }
    names
        .iter()
        .zip(values)
        .map(|(name, value)| value.ok_or_else(|| format!("the answer has no line for `{name}`")))
        .collect()
}

/// The struct column of parsed extractions: one text child per field of `fields` (in
/// [`parse_fields`]' order), a NULL row where there is no parse.
pub fn fields_array(
    fields: &Fields,
    parsed: &[Option<Vec<Option<String>>>],
) -> Result<StructArray, ArrowError> {
    let children: Vec<ArrayRef> = (0..fields.len())
        .map(|i| {
            let column: StringArray = parsed
                .iter()
                .map(|p| p.as_ref().and_then(|f| f.get(i)?.as_deref()))
                .collect();
            Arc::new(column) as ArrayRef
        })
        .collect();
    let valid = NullBuffer::from(parsed.iter().map(Option::is_some).collect::<Vec<_>>());
    StructArray::try_new(fields.clone(), children, Some(valid))
}

/// Classifies each of `texts` into one of `labels`: decoding is restricted to the labels'
/// tokens ([`abridge_models::generator::Generator::choose`]), so an answer is always a
/// listed label (an engine that cannot restrict refuses, by name).
pub async fn classify_each(
    generator: &SharedGenerator,
    texts: Vec<String>,
    labels: Arc<[String]>,
    settings: &TaskSettings,
) -> Vec<Result<Generation, GeneratorError>> {
    let seqgpt = settings.seqgpt;
    ask_each(generator, texts, settings, move |generator, head| {
        let labels = Arc::clone(&labels);
        Box::pin(async move {
            let prompt = classification_prompt(&head, &labels, seqgpt);
            generator.choose(prompt, labels).await
        })
    })
    .await
}

/// Asks the extraction question of each of `texts`; the answers, for [`parse_fields`].
/// Engines that constrain decoding fill the form in ([`Generator::fill`]: they write the
/// `name:` headings, the model the values, each up to `max_new_tokens`); others answer
/// freely.
///
/// [`Generator::fill`]: abridge_models::generator::Generator::fill
pub async fn extract_each(
    generator: &SharedGenerator,
    texts: Vec<String>,
    names: Arc<[String]>,
    settings: &TaskSettings,
) -> Vec<Result<Generation, GeneratorError>> {
    let seqgpt = settings.seqgpt;
    let max_value_tokens = settings.max_new_tokens;
    ask_each(generator, texts, settings, move |generator, head| {
        let names = Arc::clone(&names);
        Box::pin(async move {
            let prompt = extraction_prompt(&head, &names, seqgpt);
            generator.fill(prompt, names, max_value_tokens).await
        })
    })
    .await
}

/// One question about one text's head.
type Asked = BoxFuture<'static, Result<Generation, GeneratorError>>;

/// `ask(generator, head)` for each text cut to the input budget, `in_flight` at a time
/// (the engine batches what is open), answers in the texts' order.
async fn ask_each<F>(
    generator: &SharedGenerator,
    texts: Vec<String>,
    settings: &TaskSettings,
    ask: F,
) -> Vec<Result<Generation, GeneratorError>>
where
    F: Fn(SharedGenerator, String) -> Asked + Send + Sync + 'static,
{
    let ask = Arc::new(ask);
    let budget = settings.max_input_tokens;
    // Collected first: a lazy iterator of closures held across an await trips the
    // compiler's lifetime inference for `Send` futures.
    let calls: Vec<Asked> = texts
        .into_iter()
        .map(|text| {
            let (generator, ask) = (Arc::clone(generator), Arc::clone(&ask));
            Box::pin(async move {
                let head = generator.truncate(text, budget).await?;
                ask(generator, head.text).await
            }) as Asked
        })
        .collect();
    futures::stream::iter(calls)
        .buffered(settings.in_flight.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn extraction_answers_parse_strictly() {
        let fields = names(&["device", "location"]);
        assert_eq!(
            parse_fields("device: printer\nlocation：3楼\n", &fields),
            Ok(vec![Some("printer".into()), Some("3楼".into())])
        );
        assert_eq!(
            parse_fields("location: none\n\n  device:  VPN client ", &fields),
            Ok(vec![Some("VPN client".into()), None])
        );
        for (raw, why) in [
            ("device: printer", "no line for `location`"),
            ("device: a\ndevice: b\nlocation: x", "twice"),
            ("device: a\nlocation: b\nowner: c", "not asked for"),
            ("The printer on floor 3", "not `field: value`"),
            ("", "no line for `device`"),
        ] {
            let error = parse_fields(raw, &fields).expect_err(raw);
            assert!(error.contains(why), "{raw:?}: {error}");
        }
    }

    #[test]
    fn field_names_that_break_the_format_are_refused() {
        for bad in [
            &[][..],
            &[""],
            &[" product"],
            &["a,b"],
            &["a：b"],
            &["a", "a"],
        ] {
            assert!(check_field_names(&names(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(check_field_names(&names(&["error_code", "产品"])), Ok(()));
    }

    proptest::proptest! {
        /// Whatever a model answers, parsing gives every asked field or an error.
        #[test]
        fn parsing_never_returns_a_partial_answer(raw in "[a-z:：\n 无]{0,60}") {
            let fields = names(&["a", "b"]);
            if let Ok(values) = parse_fields(&raw, &fields) {
                proptest::prop_assert_eq!(values.len(), 2);
            }
        }
    }
}
