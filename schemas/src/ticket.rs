use arrow::datatypes::{DataType, Field, TimeUnit};

/// The columns of abridge's ticket schema: what every stage may rely on, whatever the
/// user's input calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketColumn {
    /// Unique key of a ticket; integers are accepted and written as text.
    Id,
    /// Optional short title, used by prompt templates.
    Title,
    /// The document to embed and summarize.
    Text,
    /// Optional creation time, kept for filtering and partitioning by date.
    CreatedAt,
    /// Optional human-written summary that ROUGE is computed against.
    Reference,
    /// Optional topic label supplied by the user.
    Topic,
}

impl TicketColumn {
    /// Every ticket column, in output order.
    pub const ALL: [TicketColumn; 6] = [
        TicketColumn::Id,
        TicketColumn::Title,
        TicketColumn::Text,
        TicketColumn::CreatedAt,
        TicketColumn::Reference,
        TicketColumn::Topic,
    ];

    /// The column's name in the output table and in `input.columns`.
    pub fn name(self) -> &'static str {
        match self {
            TicketColumn::Id => "id",
            TicketColumn::Title => "title",
            TicketColumn::Text => "text",
            TicketColumn::CreatedAt => "created_at",
            TicketColumn::Reference => "reference",
            TicketColumn::Topic => "topic",
        }
    }

    /// Whether an input without this column is rejected.
    pub fn required(self) -> bool {
        matches!(self, TicketColumn::Id | TicketColumn::Text)
    }

    /// The type the column has in the output table.
    pub fn output_type(self) -> DataType {
        match self {
            TicketColumn::CreatedAt => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            _ => DataType::Utf8,
        }
    }

    /// The output field (always nullable: per-row problems are recorded, not rejected).
    pub fn output_field(self) -> Field {
        Field::new(self.name(), self.output_type(), true)
    }

    /// Human description of the input types accepted, for error messages.
    pub(crate) fn accepted(self) -> &'static str {
        match self {
            TicketColumn::Id => "a string or integer",
            TicketColumn::CreatedAt => "a timestamp, date or string",
            _ => "a string",
        }
    }

    /// Whether an input column of this type can fill this role (by an Arrow cast).
    pub(crate) fn accepts(self, data_type: &DataType) -> bool {
        let string = is_string(data_type);
        match self {
            TicketColumn::Id => string || data_type.is_integer(),
            TicketColumn::CreatedAt => {
                string
                    || matches!(
                        data_type,
                        DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
                    )
            }
            _ => string,
        }
    }
}

fn is_string(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, value) => is_string(value),
        _ => false,
    }
}
