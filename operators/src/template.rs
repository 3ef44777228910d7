//! Text templates over a row's columns: `{title}\n{text}` for what `embed` encodes, the
//! prompt `summarize` sends. `{{` and `}}` stand for literal braces.

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;

use crate::OperatorError;

/// A parsed template; every placeholder names a column of the schema it was parsed
/// against, so rendering cannot fail on a missing column.
#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Column(usize),
}

impl Template {
    /// Parses `text` against `schema`: `{name}` must be a column of it, and at least one
    /// column must be named (a template of literals alone is always a mistake).
    pub fn parse(text: &str, schema: &Schema) -> Result<Self, OperatorError> {
        let bad = |reason: String| OperatorError::Template {
            template: text.to_string(),
            reason,
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                literal.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                return Err(bad(
                    "a `}` is not opened (write `}}` for a literal brace)".into()
                ));
            }
            let close = tail.find('}').ok_or_else(|| {
                bad("a `{` is not closed (write `{{` for a literal brace)".into())
            })?;
            let name = &tail[1..close];
            let index = schema.index_of(name).map_err(|_| {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                bad(format!("no column `{name}`; columns: {}", names.join(", ")))
            })?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Column(index));
            rest = &tail[close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
            return Err(bad("names no column, e.g. {text}".into()));
        }
        Ok(Self {
            source: text.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template uses column `index` of its schema.
    pub fn uses(&self, index: usize) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Column(i) if *i == index))
    }

    /// The literal text between placeholders (what a model may echo back).
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Literal(s) => Some(s.as_str()),
            Part::Column(_) => None,
        })
    }

    /// The text of each row where `keep` is true, in row order (nulls render as empty
    /// text; non-string columns as Arrow casts them to text).
    pub fn render(&self, batch: &RecordBatch, keep: &[bool]) -> Result<Vec<String>, OperatorError> {
        let mut columns: Vec<Option<StringArray>> = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            columns.push(match part {
                Part::Literal(_) => None,
                Part::Column(i) => {
                    let strings = cast(batch.column(*i), &DataType::Utf8)?;
                    strings.as_any().downcast_ref::<StringArray>().cloned()
                }
            });
        }
        let mut texts = Vec::new();
        for (row, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let mut text = String::new();
            for (part, column) in self.parts.iter().zip(&columns) {
                match (part, column) {
                    (Part::Literal(s), _) => text.push_str(s),
                    (Part::Column(_), Some(c)) if c.is_valid(row) => text.push_str(c.value(row)),
                    _ => {}
                }
            }
            texts.push(text);
        }
        Ok(texts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::Field;
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("title", DataType::Utf8, true),
            Field::new("text", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("Printer"), None])),
            Arc::new(StringArray::from(vec![Some("jams"), Some("VPN drops")])),
            Arc::new(Int64Array::from(vec![Some(7), None])),
        ];
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    #[test]
    fn renders_columns_nulls_and_escaped_braces() {
        let batch = batch();
        let t = Template::parse("{{json}} {title}: {text} #{n}}}", &batch.schema()).unwrap();
        assert_eq!(
            t.render(&batch, &[true, true]).unwrap(),
            vec!["{json} Printer: jams #7}", "{json} : VPN drops #}"]
        );
        assert_eq!(t.render(&batch, &[false, true]).unwrap().len(), 1);
        assert!(t.uses(1) && t.uses(2));
        assert_eq!(
            t.literals().collect::<Vec<_>>(),
            ["{json} ", ": ", " #", "}"]
        );
    }

    #[test]
    fn refuses_unknown_columns_and_unbalanced_braces() {
        let schema = batch().schema();
        for (text, says) in [
            ("{body}", "no column `body`; columns: title, text, n"),
            ("no columns", "names no column"),
            ("{text", "not closed"),
            ("text}", "not opened"),
        ] {
            let err = Template::parse(text, &schema).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
