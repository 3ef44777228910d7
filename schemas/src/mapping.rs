use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::output::{self, RESERVED};
use crate::{SchemaError, TicketColumn};

/// Which of the user's columns fills each ticket column (`input.columns` in a job file).
///
/// An unset entry means "the column of the same name": `id` and `text` must then exist,
/// the optional ones are used when present and left null otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// Column holding the ticket id (string or integer). Default: `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Column holding the document text. Default: `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Column holding a title. Default: `title` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Column holding the creation time (timestamp, date or string). Default: `created_at`
    /// when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Column holding a reference summary for ROUGE. Default: `reference` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Column holding a user-supplied topic. Default: `topic` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl ColumnMapping {
    /// The user column configured for `role`, if any.
    pub fn get(&self, role: TicketColumn) -> Option<&str> {
        match role {
            TicketColumn::Id => self.id.as_deref(),
            TicketColumn::Title => self.title.as_deref(),
            TicketColumn::Text => self.text.as_deref(),
            TicketColumn::CreatedAt => self.created_at.as_deref(),
            TicketColumn::Reference => self.reference.as_deref(),
            TicketColumn::Topic => self.topic.as_deref(),
        }
    }

    /// Checks the mapping against an input schema. `source_name` names the input in errors;
    /// `drop` lists input columns not to carry into the output; `stage_columns` are the
    /// columns the stages write (beside [`RESERVED`] and the ticket's), which no carried
    /// column may be named.
    pub fn resolve(
        &self,
        input: &Schema,
        source_name: &str,
        drop: &[String],
        stage_columns: &[&str],
    ) -> Result<ResolvedMapping, SchemaError> {
        let available = || {
            input
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut sources = [None; TicketColumn::ALL.len()];
        let mut used: HashMap<usize, TicketColumn> = HashMap::new();
        for (slot, role) in TicketColumn::ALL.into_iter().enumerate() {
            let explicit = self.get(role);
            let column = explicit.unwrap_or(role.name());
            if explicit.is_none() && drop.iter().any(|d| d == column) {
                continue;
            }
            let Ok(index) = input.index_of(column) else {
                if explicit.is_some() || role.required() {
                    return Err(SchemaError::MissingColumn {
                        source_name: source_name.to_string(),
                        column: column.to_string(),
                        role: role.name(),
                        available: available(),
                    });
                }
                continue;
            };
            let found = input.field(index).data_type();
            if !role.accepts(found) {
                return Err(SchemaError::WrongType {
                    source_name: source_name.to_string(),
                    column: column.to_string(),
                    role: role.name(),
                    found: found.clone(),
                    expected: role.accepted(),
                });
            }
            if let Some(first) = used.insert(index, role) {
                return Err(SchemaError::MappedTwice {
                    column: column.to_string(),
                    first: first.name(),
                    second: role.name(),
                });
            }
            sources[slot] = Some(index);
        }

        let mut carried = Vec::new();
        for (index, field) in input.fields().iter().enumerate() {
            if used.contains_key(&index) || drop.iter().any(|d| d == field.name()) {
                continue;
            }
            let name = field.name().as_str();
            if RESERVED.contains(&name)
                || stage_columns.contains(&name)
                || TicketColumn::ALL.iter().any(|c| c.name() == name)
            {
                return Err(SchemaError::ReservedName {
                    source_name: source_name.to_string(),
                    column: name.to_string(),
                });
            }
            carried.push(index);
        }

        let mut fields: Vec<_> = TicketColumn::ALL.iter().map(|c| c.output_field()).collect();
        fields.push(output::content_hash_field());
        fields.push(output::error_field());
        fields.extend(carried.iter().map(|&i| input.field(i).clone()));
        Ok(ResolvedMapping {
            sources,
            carried,
            output_schema: Arc::new(Schema::new(fields)),
        })
    }
}

/// A [`ColumnMapping`] checked against one input schema.
#[derive(Debug, Clone)]
pub struct ResolvedMapping {
    sources: [Option<usize>; TicketColumn::ALL.len()],
    carried: Vec<usize>,
    output_schema: SchemaRef,
}

impl ResolvedMapping {
    /// Index in the input of the column that fills `role`, if the input has one.
    pub fn source(&self, role: TicketColumn) -> Option<usize> {
        let slot = TicketColumn::ALL.iter().position(|c| *c == role)?;
        self.sources[slot]
    }

    /// Indices of input columns carried through unchanged, in input order.
    pub fn carried(&self) -> &[usize] {
        &self.carried
    }

    /// Ticket columns, then `content_hash` and `error`, then the carried columns.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};

    fn schema(fields: &[(&str, DataType)]) -> Schema {
        Schema::new(
            fields
                .iter()
                .map(|(n, t)| Field::new(*n, t.clone(), true))
                .collect::<Vec<_>>(),
        )
    }

    fn any_type() -> impl proptest::strategy::Strategy<Value = DataType> {
        proptest::sample::select(vec![
            DataType::Utf8,
            DataType::LargeUtf8,
            DataType::Utf8View,
            DataType::Int64,
            DataType::UInt32,
            DataType::Float64,
            DataType::Boolean,
            DataType::Date32,
        ])
    }

    proptest::proptest! {
        /// For any input schema and mapping: resolving never panics, and when it succeeds
        /// every input column is either mapped to exactly one role or carried, once.
        #[test]
        fn every_input_column_is_mapped_or_carried_exactly_once(
            columns in proptest::collection::vec(
                (proptest::sample::select(vec!["id", "text", "title", "body", "ticket", "topic", "x", "y", "created_at", "summary"]), any_type()),
                0..8,
            ),
            text in proptest::option::of(proptest::sample::select(vec!["body", "text", "x"])),
            id in proptest::option::of(proptest::sample::select(vec!["ticket", "id", "y"])),
        ) {
            let mut names = std::collections::HashSet::new();
            let fields: Vec<Field> = columns
                .into_iter()
                .filter(|(n, _)| names.insert(*n))
                .map(|(n, t)| Field::new(n, t, true))
                .collect();
            let input = Schema::new(fields);
            let mapping = ColumnMapping {
                id: id.map(str::to_string),
                text: text.map(str::to_string),
                ..Default::default()
            };
            if let Ok(resolved) = mapping.resolve(&input, "p", &[], &[]) {
                let mut uses = vec![0; input.fields().len()];
                for role in TicketColumn::ALL {
                    if let Some(i) = resolved.source(role) {
                        uses[i] += 1;
                        proptest::prop_assert!(role.accepts(input.field(i).data_type()));
                    }
                }
                for &i in resolved.carried() {
                    uses[i] += 1;
                }
                proptest::prop_assert!(uses.iter().all(|&u| u == 1), "{:?}", uses);
                proptest::prop_assert!(resolved.source(TicketColumn::Id).is_some());
                proptest::prop_assert!(resolved.source(TicketColumn::Text).is_some());
                let out = resolved.output_schema();
                proptest::prop_assert_eq!(out.fields().len(), TicketColumn::ALL.len() + 2 + resolved.carried().len());
            }
        }
    }

    #[test]
    fn defaults_pick_same_named_columns_and_carry_the_rest() -> Result<(), SchemaError> {
        let input = schema(&[
            ("id", DataType::Int64),
            ("text", DataType::Utf8),
            ("priority", DataType::Utf8),
            ("reference", DataType::LargeUtf8),
        ]);
        let resolved = ColumnMapping::default().resolve(&input, "t.parquet", &[], &[])?;
        assert_eq!(resolved.source(TicketColumn::Id), Some(0));
        assert_eq!(resolved.source(TicketColumn::Reference), Some(3));
        assert_eq!(resolved.source(TicketColumn::Title), None);
        assert_eq!(resolved.carried(), &[2]);
        let names: Vec<_> = resolved
            .output_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "title",
                "text",
                "created_at",
                "reference",
                "topic",
                "content_hash",
                "error",
                "priority"
            ]
        );
        Ok(())
    }

    #[test]
    fn explicit_mapping_renames_and_drop_removes() -> Result<(), SchemaError> {
        let input = schema(&[
            ("ticket_id", DataType::Utf8),
            ("body", DataType::Utf8View),
            ("secret", DataType::Utf8),
        ]);
        let mapping = ColumnMapping {
            id: Some("ticket_id".into()),
            text: Some("body".into()),
            ..Default::default()
        };
        let resolved = mapping.resolve(&input, "t.parquet", &["secret".into()], &[])?;
        assert_eq!(resolved.source(TicketColumn::Text), Some(1));
        assert!(resolved.carried().is_empty());
        Ok(())
    }

    #[test]
    fn missing_mapped_column_names_file_column_and_role() {
        let input = schema(&[("id", DataType::Utf8), ("body", DataType::Utf8)]);
        let mapping = ColumnMapping {
            text: Some("content".into()),
            ..Default::default()
        };
        let err = mapping
            .resolve(&input, "in/tickets.parquet", &[], &[])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in/tickets.parquet"), "{err}");
        assert!(err.contains("`content`"), "{err}");
        assert!(err.contains("`text`"), "{err}");
        assert!(err.contains("id, body"), "{err}");
    }

    #[test]
    fn wrong_type_is_rejected_for_mapped_columns() {
        let input = schema(&[("id", DataType::Utf8), ("text", DataType::Float64)]);
        let err = ColumnMapping::default()
            .resolve(&input, "x.parquet", &[], &[])
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(err, SchemaError::WrongType { role: "text", .. }),
            "{err}"
        );
    }

    #[test]
    fn same_named_optional_column_of_other_type_is_rejected() -> Result<(), SchemaError> {
        let input = schema(&[
            ("id", DataType::Utf8),
            ("text", DataType::Utf8),
            ("topic", DataType::Int32),
        ]);
        let err = ColumnMapping::default().resolve(&input, "x.parquet", &[], &[]);
        assert!(matches!(
            err,
            Err(SchemaError::WrongType { role: "topic", .. })
        ));
        let ok = ColumnMapping::default().resolve(&input, "x.parquet", &["topic".into()], &[])?;
        assert_eq!(ok.source(TicketColumn::Topic), None);
        Ok(())
    }

    #[test]
    fn same_column_twice_is_rejected() {
        let input = schema(&[("id", DataType::Utf8), ("body", DataType::Utf8)]);
        let mapping = ColumnMapping {
            text: Some("body".into()),
            title: Some("body".into()),
            ..Default::default()
        };
        let err = mapping
            .resolve(&input, "x", &[], &[])
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, SchemaError::MappedTwice { .. }), "{err}");
    }

    #[test]
    fn reserved_input_column_is_rejected() {
        let input = schema(&[
            ("id", DataType::Utf8),
            ("text", DataType::Utf8),
            ("summary", DataType::Utf8),
        ]);
        let err = ColumnMapping::default()
            .resolve(&input, "x", &[], &["summary"])
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("`summary`"), "{err}");
    }
}
