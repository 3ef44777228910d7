//! The batch engine and the pieces every generator model decodes with. Models depend on
//! these; nothing here depends on a model.

pub mod attention;
pub mod batch;
pub mod chat;
pub mod check;
pub mod kv;
pub mod packed;
pub mod paged;

pub use batch::{BatchGenerator, BatchModel};
