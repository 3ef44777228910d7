//! The model functions as DataFusion sees them: names, signatures, return types, and the
//! async call that hands a batch of rows to a family's calls, a few waves at a time.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use abridge_operators::embed::embedding_field;
use abridge_operators::tasks::{self, check_field_names};
use arrow::array::{
    ArrayRef, AsArray, FixedSizeListArray, Float32Array, StringArray, StructArray, new_null_array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Fields};
use async_trait::async_trait;
use datafusion::common::{ScalarValue, exec_datafusion_err, exec_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::async_udf::AsyncScalarUDFImpl;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDFImpl, Signature,
};

use super::embed::embedding_dim;
use super::{Models, Results};
use crate::sql::result_cache::Answer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Summarize,
    Embed,
    Classify,
    Extract,
}

pub(super) struct ModelFunction {
    pub(super) kind: Kind,
    /// The `try_` form: `{result, error}`.
    pub(super) detailed: bool,
    pub(super) signature: Signature,
    pub(super) models: Arc<Models>,
}

impl fmt::Debug for ModelFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelFunction")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

impl PartialEq for ModelFunction {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.detailed == other.detailed
            && Arc::ptr_eq(&self.models, &other.models)
    }
}

impl Eq for ModelFunction {}

impl Hash for ModelFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.detailed.hash(state);
        (Arc::as_ptr(&self.models) as usize).hash(state);
    }
}

impl ScalarUDFImpl for ModelFunction {
    fn name(&self) -> &str {
        match (self.kind, self.detailed) {
            (Kind::Summarize, false) => "summarize",
            (Kind::Summarize, true) => "try_summarize",
            (Kind::Embed, false) => "embed",
            (Kind::Embed, true) => "try_embed",
            (Kind::Classify, false) => "classify",
            (Kind::Classify, true) => "try_classify",
            // Not `extract`: SQL's EXTRACT(field FROM date) owns that name.
            (Kind::Extract, false) => "extract_fields",
            (Kind::Extract, true) => "try_extract_fields",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        let value = match self.kind {
            Kind::Summarize | Kind::Classify => DataType::Utf8,
            Kind::Embed => {
                let config = self.models.embed_config().map_err(DataFusionError::Plan)?;
                embedding_field(embedding_dim(&config.model)?)
                    .data_type()
                    .clone()
            }
            // Its fields are the values of its second argument.
            Kind::Extract => return plan_err!("extract_fields() needs its arguments to plan"),
        };
        Ok(match self.detailed {
            false => value,
            true => DataType::Struct(detailed_fields(value)),
        })
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        if self.kind != Kind::Extract {
            let types: Vec<DataType> = args
                .arg_fields
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            return Ok(Arc::new(Field::new(
                self.name(),
                self.return_type(&types)?,
                true,
            )));
        }
        // A text literal: the names must be known when the query is planned, before any
        // expression is folded (a list literal is still a function call then).
        let names: Vec<String> = match args.scalar_arguments.get(1) {
            Some(Some(ScalarValue::Utf8(Some(list)) | ScalarValue::LargeUtf8(Some(list))))
            | Some(Some(ScalarValue::Utf8View(Some(list)))) => {
                list.split(',').map(|n| n.trim().to_string()).collect()
            }
            _ => {
                return plan_err!(
                    "{}(text, fields): fields must be a text written in the query, the names \
                     separated by commas, e.g. 'device, location'",
                    self.name()
                );
            }
        };
        if let Err(problem) = check_field_names(&names) {
            return plan_err!("{}(): fields: the list {problem}", self.name());
        }
        let value = DataType::Struct(
            names
                .iter()
                .map(|n| Field::new(n, DataType::Utf8, true))
                .collect(),
        );
        let value = match self.detailed {
            false => value,
            true => DataType::Struct(detailed_fields(value)),
        };
        Ok(Arc::new(Field::new(self.name(), value, true)))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!("{}() runs only as an async function", self.name())
    }
}

fn detailed_fields(value: DataType) -> Fields {
    Fields::from(vec![
        Field::new("result", value, true),
        Field::new("error", DataType::Utf8, true),
    ])
}

#[async_trait]
impl AsyncScalarUDFImpl for ModelFunction {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        // A literal argument is one value: as many rows of it as the batch has.
        let arrays = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<Result<Vec<_>>>()?;
        let texts = cast(&arrays[0], &DataType::Utf8)?;
        let texts = texts.as_string::<i32>();
        let value_type = match args.return_field.data_type() {
            DataType::Struct(fields) if self.detailed => fields[0].data_type().clone(),
            other => other.clone(),
        };
        let counting = self.models.counting.load(Ordering::SeqCst);
        let prompts = match (self.kind, arrays.get(1)) {
            (Kind::Summarize, Some(p)) => Some(cast(p, &DataType::Utf8)?),
            _ => None,
        };
        let labels = match self.kind {
            Kind::Classify => Some(arrays[1].as_list_opt::<i32>().cloned().ok_or_else(|| {
                exec_datafusion_err!(
                    "classify(text, labels): labels must be a list of texts, e.g. \
                     ['billing', 'printing']"
                )
            })?),
            _ => None,
        };
        let names: Vec<String> = match (self.kind, &value_type) {
            (Kind::Extract, DataType::Struct(fields)) => {
                fields.iter().map(|f| f.name().clone()).collect()
            }
            (Kind::Extract, _) => return exec_err!("extract_fields(): its result is not a struct"),
            _ => Vec::new(),
        };
        let mut results = Results::new(0);
        for (start, len) in parts(rows, self.models.in_flight()) {
            let texts = texts.slice(start, len);
            let answered = match self.kind {
                Kind::Summarize => {
                    let prompts = prompts
                        .as_ref()
                        .map(|p| p.as_string::<i32>().slice(start, len));
                    self.models
                        .summarize(&texts, prompts.as_ref(), counting)
                        .await?
                }
                Kind::Embed => self.models.embed(&texts, counting).await?,
                Kind::Classify => {
                    let labels = labels.as_ref().map(|l| l.slice(start, len));
                    let labels =
                        labels.ok_or_else(|| exec_datafusion_err!("classify(): no labels"))?;
                    self.models.classify(&texts, &labels, counting).await?
                }
                Kind::Extract => self.models.extract(&texts, &names, counting).await?,
            };
            results.values.extend(answered.values);
            results.errors.extend(answered.errors);
            if !counting && let Err(e) = self.models.cache.persist() {
                // A cache that cannot be written only costs those answers.
                tracing::warn!("model result cache: {e} (these answers are not kept)");
            }
        }
        let failed = results.errors.iter().flatten().count();
        if counting {
            let failed = failed as u64;
            self.models
                .counted_failed
                .fetch_add(failed, Ordering::SeqCst);
        }
        if failed > 0 && self.models.options.fail_on_error && !counting {
            let first = results
                .errors
                .iter()
                .flatten()
                .next()
                .cloned()
                .unwrap_or_default();
            return exec_err!(
                "{}(): {failed} of {rows} rows failed (--fail-on-error), the first: {first}",
                self.name()
            );
        }
        let values = build_values(&results.values, &value_type)?;
        if !self.detailed {
            return Ok(ColumnarValue::Array(values));
        }
        let errors: ArrayRef = Arc::new(StringArray::from(results.errors));
        let fields = detailed_fields(value_type);
        let result = StructArray::try_new(fields, vec![values, errors], None)?;
        Ok(ColumnarValue::Array(Arc::new(result)))
    }
}

/// The parts (start, length) a batch of `rows` goes to the model in: four waves of
/// `in_flight` requests each, whose answers are kept before the next part is asked, so
/// that a query stopped halfway keeps what it paid for.
pub(super) fn parts(rows: usize, in_flight: usize) -> impl Iterator<Item = (usize, usize)> {
    let part = (4 * in_flight).max(1);
    (0..rows)
        .step_by(part)
        .map(move |start| (start, part.min(rows - start)))
}

/// The answers as an array of `value_type` (text, or the embedding's fixed-size list).
fn build_values(values: &[Option<Answer>], value_type: &DataType) -> Result<ArrayRef> {
    match value_type {
        DataType::Utf8 => Ok(Arc::new(StringArray::from_iter(values.iter().map(
            |v| match v {
                Some(Answer::Text(t)) => Some(t.as_str()),
                _ => None,
            },
        )))),
        DataType::FixedSizeList(item, dim) => {
            let dim = *dim as usize;
            let mut floats = Vec::with_capacity(values.len() * dim);
            let mut valid = Vec::with_capacity(values.len());
            for value in values {
                match value {
                    Some(Answer::Vector(v)) if v.len() == dim => {
                        floats.extend_from_slice(v);
                        valid.push(true);
                    }
                    _ => {
                        floats.extend(std::iter::repeat_n(0.0, dim));
                        valid.push(false);
                    }
                }
            }
            let array = FixedSizeListArray::try_new(
                Arc::clone(item),
                dim as i32,
                Arc::new(Float32Array::from(floats)),
                Some(NullBuffer::from(valid)),
            )?;
            Ok(Arc::new(array))
        }
        DataType::Struct(fields) => {
            // Answers here parsed once already (rows that did not are errors, and None).
            let names: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
            let parsed: Vec<Option<Vec<Option<String>>>> = values
                .iter()
                .map(|v| match v {
                    Some(Answer::Text(raw)) => tasks::parse_fields(raw, &names).ok(),
                    _ => None,
                })
                .collect();
            Ok(Arc::new(tasks::fields_array(fields, &parsed)?))
        }
        other => Ok(new_null_array(other, values.len())),
    }
}
