//! The Arrow schemas that abridge reads and writes, and the mapping of a user's columns
//! onto them.
//!
//! Input tables are the user's: any Parquet with an id and a text column under any names.
//! [`ColumnMapping`] says which user column plays which [`TicketColumn`];
//! [`ColumnMapping::resolve`] checks it against a real input schema and yields a
//! [`ResolvedMapping`] whose output schema every later stage builds on. The output table
//! always carries the ticket columns (null where the input had none), so runs over
//! different inputs stay queryable as one table.
#![warn(missing_docs)]

mod error;
mod mapping;
pub mod output;
mod ticket;

pub use error::SchemaError;
pub use mapping::{ColumnMapping, ResolvedMapping};
pub use ticket::TicketColumn;
