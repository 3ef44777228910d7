use arrow::datatypes::DataType;

/// What can be wrong with an input table's columns or a column mapping.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A column the mapping names (or a required default) is not in the input.
    #[error(
        "{source_name}: column `{column}` (for `{role}`) not found; the input has: {available}"
    )]
    MissingColumn {
        /// The input the schema came from (a file, folder or glob).
        source_name: String,
        /// The user's column name that was looked for.
        column: String,
        /// The ticket column it was meant to fill.
        role: &'static str,
        /// The input's column names, comma-separated.
        available: String,
    },
    /// A mapped column has a type abridge cannot use for its role.
    #[error(
        "{source_name}: column `{column}` (for `{role}`) has type {found}, expected {expected}"
    )]
    WrongType {
        /// The input the schema came from.
        source_name: String,
        /// The user's column name.
        column: String,
        /// The ticket column it was meant to fill.
        role: &'static str,
        /// The type found in the input.
        found: DataType,
        /// The kinds of type accepted for the role.
        expected: &'static str,
    },
    /// The same user column is mapped to two ticket columns.
    #[error("column `{column}` is mapped to both `{first}` and `{second}`")]
    MappedTwice {
        /// The user's column name.
        column: String,
        /// One ticket column it is mapped to.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// An input column that would be carried through has a name abridge writes itself.
    #[error(
        "{source_name}: input column `{column}` has the name of a column abridge writes; \
         rename it in the input or drop it with `input.drop`"
    )]
    ReservedName {
        /// The input the schema came from.
        source_name: String,
        /// The clashing column name.
        column: String,
    },
}
