//! The measures as SQL functions, so that a user can recompute or slice them ad hoc over
//! any table (`abridge sql`), with the very code the `metrics` stage runs:
//!
//! | function | returns |
//! | --- | --- |
//! | `rouge_n(candidate, reference, n [, stem])` | ROUGE-N F1 |
//! | `rouge_l(candidate, reference [, stem])` | ROUGE-L F1 |
//! | `rouge_n_scores(...)`, `rouge_l_scores(...)` | `{precision, recall, f1}` |
//! | `rouge(candidate, reference [, stem])` | `{rouge1, rouge2, rouge_l}` F1, tokenizing once |
//! | `cosine(a, b)` | cosine of two vectors (embedding columns) |
//! | `compression(summary, text)` | characters of summary per character of text |
//!
//! A null argument gives a null result, as SQL functions do.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, StringArray, StructArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Fields, Float32Type};
use datafusion::common::exec_err;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use rayon::prelude::*;

use super::{measures, rouge};

/// Every function of this module, to register with a DataFusion session.
pub fn all() -> Vec<ScalarUDF> {
    [
        Measure::RougeN { scores: false },
        Measure::RougeN { scores: true },
        Measure::RougeL { scores: false },
        Measure::RougeL { scores: true },
        Measure::Rouge,
        Measure::Cosine,
        Measure::Compression,
    ]
    .into_iter()
    .map(|measure| {
        let arities: &[usize] = match measure {
            Measure::RougeN { .. } => &[3, 4],
            Measure::RougeL { .. } | Measure::Rouge => &[2, 3],
            Measure::Cosine | Measure::Compression => &[2],
        };
        let signature = Signature::one_of(
            arities.iter().map(|&n| TypeSignature::Any(n)).collect(),
            Volatility::Immutable,
        );
        ScalarUDF::new_from_impl(MeasureFunction { measure, signature })
    })
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Measure {
    Rouge,
    RougeN { scores: bool },
    RougeL { scores: bool },
    Cosine,
    Compression,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct MeasureFunction {
    measure: Measure,
    signature: Signature,
}

fn score_fields() -> Fields {
    ["precision", "recall", "f1"]
        .iter()
        .map(|name| Field::new(*name, DataType::Float64, true))
        .collect()
}

fn rouge_fields() -> Fields {
    [super::ROUGE1, super::ROUGE2, super::ROUGE_L]
        .iter()
        .map(|name| Field::new(*name, DataType::Float64, true))
        .collect()
}

impl ScalarUDFImpl for MeasureFunction {
    fn name(&self) -> &str {
        match self.measure {
            Measure::RougeN { scores: false } => "rouge_n",
            Measure::RougeN { scores: true } => "rouge_n_scores",
            Measure::RougeL { scores: false } => "rouge_l",
            Measure::RougeL { scores: true } => "rouge_l_scores",
            Measure::Rouge => "rouge",
            Measure::Cosine => "cosine",
            Measure::Compression => "compression",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.measure {
            Measure::RougeN { scores: true } | Measure::RougeL { scores: true } => {
                DataType::Struct(score_fields())
            }
            Measure::Rouge => DataType::Struct(rouge_fields()),
            _ => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let rows = args.number_rows;
        let result: ArrayRef = match self.measure {
            Measure::RougeN { scores } => {
                let (candidate, reference) = (text(&arrays[0])?, text(&arrays[1])?);
                let n = cast(&arrays[2], &DataType::Int64)?;
                let n = n.as_primitive::<arrow::datatypes::Int64Type>();
                let stem = stem_flags(arrays.get(3))?;
                let pairs = score_pairs(&candidate, &reference, &stem, rows, |c, rf, r| {
                    let order = n.is_valid(r).then(|| n.value(r)).filter(|&n| n >= 1)?;
                    Some(rouge::rouge_n(c, rf, order as usize))
                });
                scores_or_f1(pairs, scores)
            }
            Measure::RougeL { scores } => {
                let (candidate, reference) = (text(&arrays[0])?, text(&arrays[1])?);
                let stem = stem_flags(arrays.get(2))?;
                let pairs = score_pairs(&candidate, &reference, &stem, rows, |c, rf, _| {
                    Some(rouge::rouge_l(c, rf))
                });
                scores_or_f1(pairs, scores)
            }
            Measure::Rouge => {
                let (candidate, reference) = (text(&arrays[0])?, text(&arrays[1])?);
                let stem = stem_flags(arrays.get(2))?;
                let all = score_pairs(&candidate, &reference, &stem, rows, |c, rf, _| {
                    Some([
                        rouge::rouge_n(c, rf, 1),
                        rouge::rouge_n(c, rf, 2),
                        rouge::rouge_l(c, rf),
                    ])
                });
                let column = |i: usize| -> ArrayRef {
                    Arc::new(Float64Array::from_iter(
                        all.iter().map(|s| s.map(|s| s[i].f1)),
                    ))
                };
                let nulls = arrow::buffer::NullBuffer::from_iter(all.iter().map(Option::is_some));
                Arc::new(StructArray::new(
                    rouge_fields(),
                    vec![column(0), column(1), column(2)],
                    Some(nulls),
                ))
            }
            Measure::Cosine => {
                let list = DataType::List(Arc::new(Field::new("item", DataType::Float32, true)));
                let (a, b) = (cast(&arrays[0], &list)?, cast(&arrays[1], &list)?);
                let (a, b) = (a.as_list::<i32>(), b.as_list::<i32>());
                let vector = |list: &arrow::array::ListArray, r: usize| -> Option<Vec<f32>> {
                    if list.is_null(r) {
                        return None;
                    }
                    let values = list.value(r);
                    let values = values.as_primitive::<Float32Type>();
                    (values.null_count() == 0).then(|| values.values().to_vec())
                };
                Arc::new(Float64Array::from_iter(
                    (0..rows).map(|r| measures::cosine(&vector(a, r)?, &vector(b, r)?)),
                ))
            }
            Measure::Compression => {
                let (summary, source) = (text(&arrays[0])?, text(&arrays[1])?);
                Arc::new(Float64Array::from_iter((0..rows).map(|r| {
                    measures::compression(value(&summary, r)?, value(&source, r)?)
                })))
            }
        };
        Ok(ColumnarValue::Array(result))
    }
}

fn text(array: &ArrayRef) -> Result<StringArray> {
    match cast(array, &DataType::Utf8) {
        Ok(strings) => Ok(strings.as_string::<i32>().clone()),
        Err(_) => exec_err!("expected text, got {}", array.data_type()),
    }
}

fn value(array: &StringArray, row: usize) -> Option<&str> {
    array.is_valid(row).then(|| array.value(row))
}

fn stem_flags(array: Option<&ArrayRef>) -> Result<Option<BooleanArray>> {
    array
        .map(|a| Ok(cast(a, &DataType::Boolean)?.as_boolean().clone()))
        .transpose()
}

fn flag(flags: &Option<BooleanArray>, row: usize) -> bool {
    flags
        .as_ref()
        .is_some_and(|f| f.is_valid(row) && f.value(row))
}

/// `score` of each row's tokenized pair, null where a text is null; rows in parallel
/// (each thread with its own vocabulary), as they are independent.
fn score_pairs<S: Send>(
    candidate: &StringArray,
    reference: &StringArray,
    stem: &Option<BooleanArray>,
    rows: usize,
    score: impl Fn(&[u32], &[u32], usize) -> Option<S> + Sync,
) -> Vec<Option<S>> {
    (0..rows)
        .into_par_iter()
        .map_init(rouge::Vocabulary::default, |vocabulary, r| {
            let (c, rf) = (value(candidate, r)?, value(reference, r)?);
            let stem = flag(stem, r);
            vocabulary.clear();
            let (c, rf) = (vocabulary.tokens(c, stem), vocabulary.tokens(rf, stem));
            score(&c, &rf, r)
        })
        .collect()
}

fn scores_or_f1(pairs: Vec<Option<rouge::Score>>, scores: bool) -> ArrayRef {
    if !scores {
        return Arc::new(Float64Array::from_iter(
            pairs.iter().map(|s| s.map(|s| s.f1)),
        ));
    }
    let column = |pick: fn(&rouge::Score) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter(
            pairs.iter().map(|s| s.as_ref().map(pick)),
        ))
    };
    let nulls = arrow::buffer::NullBuffer::from_iter(pairs.iter().map(Option::is_some));
    Arc::new(StructArray::new(
        score_fields(),
        vec![
            column(|s| s.precision),
            column(|s| s.recall),
            column(|s| s.f1),
        ],
        Some(nulls),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn one(sql: &str) -> String {
        let ctx = SessionContext::new();
        for f in all() {
            ctx.register_udf(f);
        }
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn functions_answer_in_sql() {
        let out = one(
            "SELECT rouge_n('the cat lay on the mat', 'the cat sat on the mat', 2) AS r2, \
             rouge_l('the cat lay on the mat', 'the cat sat on the mat') AS rl, \
             rouge_l('printers running', 'printer run', true) AS stemmed, \
             rouge_n_scores('the the the', 'the cat', 1)['recall'] AS recall, \
             compression('ab', 'abcd') AS c, \
             cosine([1.0, 0.0], [1.0, 1.0]) AS cos, \
             rouge('the cat lay on the mat', 'the cat sat on the mat')['rouge2'] AS combined",
        )
        .await;
        for expected in ["0.6", "0.8333333333333", "| 1.0 ", "0.5", "0.7071067"] {
            assert!(out.contains(expected), "{expected} not in\n{out}");
        }
        let nulls =
            one("SELECT rouge_l(NULL, 'x') IS NULL AND compression('a', NULL) IS NULL AS n").await;
        assert!(nulls.contains("true"), "{nulls}");
        let same = one(
            "SELECT rouge('a b c d', 'a b d c', true) = \
             {'rouge1': rouge_n('a b c d', 'a b d c', 1), 'rouge2': rouge_n('a b c d', 'a b d c', 2), \
              'rouge_l': rouge_l('a b c d', 'a b d c')} AS same",
        )
        .await;
        assert!(same.contains("true"), "{same}");
    }
}
