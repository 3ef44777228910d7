//! `normalize`: puts the user's columns under the ticket schema's names and types, checks
//! each row, and stamps it with a content hash.
//!
//! Rows with a null or blank id, a null or blank text, or an unreadable `created_at` keep
//! flowing with the reason in `error`; nothing here fails a whole batch for one bad row.

use std::fmt::Write as _;
use std::sync::Arc;

use abridge_schemas::{ColumnMapping, ResolvedMapping, TicketColumn};
use arrow::array::{Array, ArrayRef, StringArray, StringBuilder, new_null_array};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::{BatchTransform, OperatorError, StageCounters, TransformStage};

/// Separates title and text in the hashed content, so that moving words between the two
/// changes the hash.
const FIELD_SEPARATOR: u8 = 0x1f;

/// The `normalize` stage, built from a column mapping and the input's schema.
#[derive(Debug)]
pub struct Normalize {
    mapping: ResolvedMapping,
}

impl Normalize {
    /// Checks `mapping` against `input` (named `source_name` in errors); `drop` lists input
    /// columns not to carry through; `stage_columns` are those the stages write.
    pub fn try_new(
        mapping: &ColumnMapping,
        input: &SchemaRef,
        source_name: &str,
        drop: &[String],
        stage_columns: &[&str],
    ) -> Result<TransformStage<Self>, OperatorError> {
        let mapping = mapping.resolve(input, source_name, drop, stage_columns)?;
        Ok(TransformStage::new("normalize", Self { mapping }))
    }
}

impl BatchTransform for Normalize {
    fn schema(&self) -> SchemaRef {
        Arc::clone(self.mapping.output_schema())
    }

    fn transform(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let rows = batch.num_rows();
        let mut problems: Vec<Vec<&'static str>> = vec![Vec::new(); rows];
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema().fields().len());
        for role in TicketColumn::ALL {
            let column = match self.mapping.source(role) {
                None => new_null_array(&role.output_type(), rows),
                Some(index) => {
                    let source = batch.column(index);
                    // `safe` casts turn unparsable values into nulls; a null that was not
                    // null before is a row problem, reported below rather than failing the batch.
                    let options = CastOptions {
                        safe: true,
                        ..Default::default()
                    };
                    let cast = cast_with_options(source, &role.output_type(), &options)?;
                    if cast.null_count() > source.null_count() {
                        for (row, problem) in problems.iter_mut().enumerate() {
                            if cast.is_null(row) && source.is_valid(row) {
                                problem.push(unreadable(role));
                            }
                        }
                    }
                    cast
                }
            };
            columns.push(column);
        }

        let id = as_strings(&columns[position(TicketColumn::Id)])?;
        let text = as_strings(&columns[position(TicketColumn::Text)])?;
        let title = as_strings(&columns[position(TicketColumn::Title)])?;
        for (row, problem) in problems.iter_mut().enumerate() {
            if id.is_null(row) {
                problem.push("id is null");
            } else if id.value(row).trim().is_empty() {
                problem.push("id is blank");
            }
            if text.is_null(row) {
                problem.push("text is null");
            } else if text.value(row).trim().is_empty() {
                problem.push("text is empty");
            }
        }

        let hashes = content_hashes(title, text);
        let mut errors = StringBuilder::with_capacity(rows, 0);
        let mut failed = 0;
        for problem in &problems {
            if problem.is_empty() {
                errors.append_null();
            } else {
                failed += 1;
                errors.append_value(problem.join("; "));
            }
        }
        metrics.add_failed(failed);

        columns.push(Arc::new(hashes));
        columns.push(Arc::new(errors.finish()));
        columns.extend(
            self.mapping
                .carried()
                .iter()
                .map(|&i| Arc::clone(batch.column(i))),
        );
        Ok(RecordBatch::try_new(self.schema(), columns)?)
    }
}

fn position(role: TicketColumn) -> usize {
    TicketColumn::ALL
        .iter()
        .position(|c| *c == role)
        .unwrap_or_default()
}

fn unreadable(role: TicketColumn) -> &'static str {
    match role {
        TicketColumn::CreatedAt => "created_at is not a readable timestamp",
        TicketColumn::Id => "id is not readable as text",
        _ => "value is not readable as text",
    }
}

fn as_strings(array: &ArrayRef) -> Result<&StringArray, OperatorError> {
    array.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
        OperatorError::Arrow(arrow::error::ArrowError::CastError(format!(
            "expected Utf8 after cast, found {}",
            array.data_type()
        )))
    })
}

/// 128 bits of BLAKE3 over title and text, as 32 hex digits: enough that two different
/// tickets never share a hash, short enough to index and compare in SQL.
fn content_hashes(title: &StringArray, text: &StringArray) -> StringArray {
    let mut out = StringBuilder::with_capacity(text.len(), text.len() * 32);
    let mut hex = String::with_capacity(32);
    for row in 0..text.len() {
        if text.is_null(row) {
            out.append_null();
            continue;
        }
        let mut hasher = blake3::Hasher::new();
        if title.is_valid(row) {
            hasher.update(title.value(row).as_bytes());
        }
        hasher.update(&[FIELD_SEPARATOR]);
        hasher.update(text.value(row).as_bytes());
        hex.clear();
        for byte in &hasher.finalize().as_bytes()[..16] {
            let _ = write!(hex, "{byte:02x}");
        }
        out.append_value(&hex);
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn run(
        batch: RecordBatch,
        mapping: ColumnMapping,
    ) -> Result<(RecordBatch, u64), OperatorError> {
        let op = Normalize::try_new(&mapping, &batch.schema(), "test", &[], &[])?;
        let metrics = StageCounters::default();
        let out = op.inner().transform(batch, &metrics)?;
        Ok((out, metrics.snapshot().rows_failed))
    }

    fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let col = batch.column_by_name(name).map(Arc::clone);
        let col = col
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        col.map(|c| c.iter().map(|v| v.map(str::to_string)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn maps_casts_hashes_and_records_row_problems() -> Result<(), OperatorError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ticket", DataType::Int64, true),
            Field::new("body", DataType::Utf8, true),
            Field::new("opened", DataType::Utf8, true),
            Field::new("team", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(7), Some(8), None, Some(10)])),
                Arc::new(StringArray::from(vec![
                    Some("printer on fire"),
                    Some("  "),
                    Some("x"),
                    None,
                ])),
                Arc::new(StringArray::from(vec![
                    Some("2026-01-02T03:04:05Z"),
                    Some("yesterday"),
                    None,
                    Some("2026-01-02"),
                ])),
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
            ],
        )?;
        let mapping = ColumnMapping {
            id: Some("ticket".into()),
            text: Some("body".into()),
            created_at: Some("opened".into()),
            ..Default::default()
        };
        let (out, failed) = run(batch, mapping)?;
        assert_eq!(failed, 3);
        assert_eq!(
            strings(&out, "id"),
            [Some("7".into()), Some("8".into()), None, Some("10".into())]
        );
        assert_eq!(
            strings(&out, "error"),
            [
                None,
                Some("created_at is not a readable timestamp; text is empty".into()),
                Some("id is null".into()),
                Some("text is null".into()),
            ]
        );
        assert_eq!(strings(&out, "team").len(), 4);
        let created = out.column_by_name("created_at").and_then(|c| {
            c.as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .cloned()
        });
        assert_eq!(created.map(|c| c.value(0)), Some(1_767_323_045_000_000));
        let hashes = strings(&out, "content_hash");
        assert_eq!(hashes[0].as_ref().map(String::len), Some(32));
        assert_eq!(hashes[3], None);
        Ok(())
    }

    #[test]
    fn hash_depends_on_title_and_text_not_on_id() -> Result<(), OperatorError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("title", DataType::Utf8, true),
            Field::new("text", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(StringArray::from(vec![
                    Some("t"),
                    Some("t"),
                    Some("tx"),
                    None,
                ])),
                Arc::new(StringArray::from(vec!["x", "x", "", "x"])),
            ],
        )?;
        let (out, _) = run(batch, ColumnMapping::default())?;
        let h = strings(&out, "content_hash");
        assert_eq!(h[0], h[1]);
        assert_ne!(
            h[0], h[2],
            "moving text into the title must change the hash"
        );
        assert_ne!(h[0], h[3]);
        Ok(())
    }
}
